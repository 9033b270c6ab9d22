"""Checkpoint and restart end to end through the daemon: real containers and
host processes, checkpointed over the Checkpoint RPC, killed, and restarted
over the Restart RPC from the streamed image."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import Daemon, pid_gone, wait_for
from ckptd.v1 import api_pb2 as pb

# A Python counter: a heap it checks, and a counter it keeps in a file.
COUNTER_PY = r"""
import os, sys, time, zlib
out = sys.argv[1]
heap = {i: str(i) * 3 for i in range(50000)}
digest = zlib.crc32(repr(sorted(heap.items())).encode())
n = 0
while True:
    n += 1
    if n % 10 == 0:
        ok = zlib.crc32(repr(sorted(heap.items())).encode()) == digest if n % 500 == 0 else True
        with open(out + ".tmp", "w") as f:
            f.write(f"{n} {os.getpid()} {'ok' if ok else 'HEAP-CORRUPT'}\n")
        os.replace(out + ".tmp", out)
    time.sleep(0.002)
"""


def read_count(path: Path) -> tuple[int, int, str]:
    try:
        n, pid, ok = path.read_text().split()
        return int(n), int(pid), ok
    except (FileNotFoundError, ValueError):
        return 0, 0, ""


def grows(path: Path, timeout: float = 5.0) -> int:
    first = wait_for(lambda: read_count(path)[0], timeout, f"{path} to count")
    wait_for(lambda: read_count(path)[0] > first, timeout, f"{path} to grow")
    return first


def test_container_checkpoint_kill_restart(daemon: Daemon, tmp_short: Path) -> None:
    counter = tmp_short / "count"
    image = tmp_short / "ctr.img"
    with daemon.client() as c:
        ctr = c.run([sys.executable, "-c", COUNTER_PY, str(counter)], name="counter",
                    hostname="ck-host")
        grows(counter)
    r = daemon.ckptctl("checkpoint", ctr.id, "-o", str(image), timeout=120)
    assert r.returncode == 0, r.stderr.decode() + daemon.log()
    stopped_at = read_count(counter)[0]
    with daemon.client() as c:
        old = c.status(ctr.id).container
        assert old.state == pb.CONTAINER_STATE_EXITED and old.exit_signal == signal.SIGKILL
        assert any("checkpointed" in n for n in old.notes)
    time.sleep(0.3)
    assert read_count(counter)[0] == stopped_at, "the checkpointed process was stopped"

    r = daemon.ckptctl("--json", "image", "inspect", str(image))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["trailer"]

    r = daemon.ckptctl("--json", "restart", "-i", str(image), "--name", "counter2", timeout=30)
    assert r.returncode == 0, r.stderr.decode() + daemon.log()
    new = json.loads(r.stdout)
    with daemon.client() as c:
        info = c.status("counter2").container
        assert info.state == pb.CONTAINER_STATE_RUNNING
        assert info.init_ns_pid == 1 and info.hostname == "ck-host"
        n = wait_for(lambda: read_count(counter)[0] > stopped_at and read_count(counter)[0],
                     10, "the restored counter to go on")
        assert n < stopped_at + 5000, "it went on from where it stopped, not from zero"
        assert read_count(counter)[1] == 1, "pid 1 in its own namespace, as before"
        # It is a container like any other: freeze, kill, delete work.
        c.freeze("counter2")
        c.thaw("counter2")
        c.kill("counter2", signal=signal.SIGKILL)
        c.delete("counter2")
        c.delete(ctr.id)
    assert new["id"]


def test_checkpoint_piped_into_a_restart(daemon_factory, tmp_short: Path) -> None:
    """The move between daemons the README shows: `ckptctl checkpoint ID -o - |
    ckptctl --address OTHER restart -i -`. The image streams over gRPC both
    ways (no local files on a pipe); the first is killed only once its
    ckptctl has flushed the whole image into the pipe; the second counts on."""
    import shlex
    import shutil
    here, there = daemon_factory(), daemon_factory()
    counter = tmp_short / "count"
    with here.client() as c:
        ctr = c.run([sys.executable, "-c", COUNTER_PY, str(counter)], name="mover")
        grows(counter)
    exe = shutil.which("ckptctl") or f"{sys.executable} -m ckptd_client.cli"
    line = (f"{exe} --address {shlex.quote(here.address)} checkpoint {ctr.id} -o - | "
            f"{exe} --address {shlex.quote(there.address)} --json restart -i - --name moved")
    r = subprocess.run(["bash", "-o", "pipefail", "-c", line], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode() + here.log() + there.log()
    moved = json.loads(r.stdout)
    with here.client() as c:
        old = c.status(ctr.id).container
        assert old.state == pb.CONTAINER_STATE_EXITED and old.exit_signal == signal.SIGKILL
        c.delete(ctr.id)
    assert [e.get("result") for e in here.events("rpc") if e.get("method") == "ConfirmCheckpoint"] \
        == ["OK"], "killed after the confirmation"
    with there.client() as c:
        assert c.status("moved").container.state == pb.CONTAINER_STATE_RUNNING
        grows(counter)
        c.kill(moved["id"], signal=signal.SIGKILL)
        c.delete(moved["id"])


def test_leave_running_and_progress(daemon: Daemon, tmp_short: Path) -> None:
    counter = tmp_short / "count"
    with daemon.client() as c:
        ctr = c.run([sys.executable, "-c", COUNTER_PY, str(counter)])
        grows(counter)
        seen: list[pb.Operation] = []
        done = threading.Event()

        def watch() -> None:
            with daemon.client() as w:
                while not done.is_set():
                    seen.extend(w.status(ctr.id).operations)
                    time.sleep(0.002)
        t = threading.Thread(target=watch)
        t.start()
        try:
            data = b"".join(c.checkpoint(ctr.id, leave_running=True))
        finally:
            done.set()
            t.join()
        assert data.startswith(b"CKPTIMG\0")
        assert c.status(ctr.id).container.state == pb.CONTAINER_STATE_RUNNING
        grows(counter)
        assert any(op.kind == pb.OPERATION_KIND_CHECKPOINT for op in seen), \
            "Status reports the running checkpoint"
        # A second checkpoint of the same, still running, container works too.
        again = b"".join(c.checkpoint(ctr.id, leave_running=True))
        assert again.startswith(b"CKPTIMG\0")
        grows(counter)


def test_bad_images_leave_nothing_behind(daemon: Daemon, tmp_short: Path) -> None:
    with daemon.client() as c:
        ctr = c.run(["sleep", "1000"])
        good = b"".join(c.checkpoint(ctr.id, leave_running=True))
        c.delete(ctr.id, force=True)
    bad = {
        "truncated": good[: len(good) // 2],
        "corrupt": good[:200] + bytes([good[200] ^ 0xFF]) + good[201:],
        "garbage": b"not an image at all" * 10,
        "empty": b"",
    }
    for what, data in bad.items():
        path = tmp_short / f"{what}.img"
        path.write_bytes(data)
        r = daemon.ckptctl("restart", "-i", str(path), timeout=60)
        assert r.returncode in (2, 9), (what, r.returncode, r.stderr)
        assert b"Traceback" not in r.stderr and b"image" in r.stderr, (what, r.stderr)
        with daemon.client() as c:
            assert c.list() == [], f"{what}: no container is left behind"
        left = [d for d in daemon.cgroup_dirs() if any(p.is_dir() for p in d.iterdir())]
        assert not left, f"{what}: no cgroup is left behind"


def test_refused_checkpoint_leaves_container_running(daemon: Daemon, tmp_short: Path) -> None:
    counter = tmp_short / "count"
    holder = (f"import socket, runpy, sys; a, b = socket.socketpair(); "
              f"sys.argv = ['x', {str(counter)!r}]; exec({COUNTER_PY!r})")
    with daemon.client() as c:
        ctr = c.run([sys.executable, "-c", holder])
        grows(counter)
        from ckptd_client import errors
        with pytest.raises(errors.ClientError) as e:
            b"".join(c.checkpoint(ctr.id))
        assert e.value.code in ("UNIMPLEMENTED", "FAILED_PRECONDITION", "INVALID_ARGUMENT")
        assert "socket" in e.value.message
        assert c.status(ctr.id).container.state == pb.CONTAINER_STATE_RUNNING
        grows(counter)


def test_host_process_by_pid(daemon: Daemon, tmp_short: Path) -> None:
    """A host tree (a shell's `sleep 999` with a `sleep 1000` child) by
    --pid: restored with its pids, the whole tree in the new container's
    cgroup (Status counts both, Kill ends both)."""
    out = tmp_short / "sleep.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(["bash", "-c", "sleep 1000 & exec sleep 999"], stdout=f,
                                stderr=f, stdin=subprocess.DEVNULL, start_new_session=True)
    pid, child = proc.pid, 0
    image = tmp_short / "host.img"
    try:
        wait_for(lambda: Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\x00999")
                 and Path(f"/proc/{pid}/task/{pid}/children").read_text().split(), 10,
                 "the tree")
        child = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
        r = daemon.ckptctl("checkpoint", "--pid", str(pid), "-o", str(image), timeout=60)
        assert r.returncode == 0, r.stderr.decode() + daemon.log()
        assert proc.wait(10) == -signal.SIGKILL
        wait_for(lambda: pid_gone(pid), 10, "the old pid to be free")
        r = daemon.ckptctl("--json", "restart", "-i", str(image), timeout=60)
        assert r.returncode == 0, r.stderr.decode() + daemon.log()
        restored = json.loads(r.stdout)
        assert int(restored["init_pid"]) == pid, "same pid in the host namespace"
        assert Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x00999\x00"
        assert Path(f"/proc/{pid}/task/{pid}/children").read_text().split() == [str(child)]
        with daemon.client() as c:
            assert c.status(restored["id"]).container.num_tasks == 2
        # Restoring again while the pid is taken fails and names the pid.
        r = daemon.ckptctl("restart", "-i", str(image), timeout=60)
        assert r.returncode != 0 and str(pid).encode() in r.stderr
        with daemon.client() as c:
            c.kill(restored["id"], signal=signal.SIGKILL)
            wait_for(lambda: pid_gone(pid) and pid_gone(child), 10,
                     "the restored processes to die")
            assert c.status(restored["id"]).container.exit_signal == signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in (pid, child):
            if p and not pid_gone(p):
                os.kill(p, signal.SIGKILL)


def test_uts_names_come_back(daemon: Daemon, tmp_short: Path) -> None:
    from ckptd.kernel.namespaces import uts_names
    with daemon.client() as c:
        ctr = c.run(["sh", "-c", "echo renamed > /proc/sys/kernel/hostname; "
                     "echo example.org > /proc/sys/kernel/domainname; exec sleep 1000"],
                    hostname="first", network="new")
        wait_for(lambda: uts_names(ctr.init_pid)[0] == "renamed"
                 and Path(f"/proc/{ctr.init_pid}/cmdline").read_bytes().startswith(b"sleep"),
                 5, "the container to rename itself")
        image = b"".join(c.checkpoint(ctr.id))
        new = c.restart(iter([image]))
        assert uts_names(new.init_pid) == ("renamed", "example.org")
        assert os.readlink(f"/proc/{new.init_pid}/ns/net") != os.readlink("/proc/self/ns/net"), \
            "a container that had its own network namespace gets a new one"
        c.delete(new.id, force=True)


@pytest.mark.parametrize("name", ["signals", "timers", "files", "memory", "regs",
                                  "limits_creds", "seccomp_rseq", "threads"])
def test_workload_in_a_container(daemon: Daemon, tmp_short: Path, name: str) -> None:
    """A self-checking workload run by the daemon, checkpointed (killed) and
    restarted through the RPCs, then told to verify itself."""
    from workloads.workloads import build
    wdir = tmp_short / name
    wdir.mkdir()
    with daemon.client() as c:
        ctr = c.run([str(build(name)), str(wdir)], cwd=str(wdir))
        wait_for(lambda: (wdir / "ready").exists(), 20, f"{name} to be ready")
        image = b"".join(c.checkpoint(ctr.id))
        new = c.restart(iter([image]))
        (wdir / "go").touch()
        result = wait_for(lambda: (wdir / "result").exists() and (wdir / "result").read_text(),
                          20, f"{name} to verify itself")
        assert result.strip() == "PASS", result + b"".join(c.logs(new.id)).decode()
        for x in (new.id, ctr.id):
            c.delete(x, force=True)


def test_workload_after_leave_running(daemon: Daemon, tmp_short: Path) -> None:
    """--leave-running: the workload verifies itself in the same process after
    a checkpoint and finds nothing disturbed."""
    from workloads.workloads import build
    wdir = tmp_short / "sig"
    wdir.mkdir()
    with daemon.client() as c:
        ctr = c.run([str(build("signals")), str(wdir)], cwd=str(wdir))
        wait_for(lambda: (wdir / "ready").exists(), 20, "ready")
        assert b"".join(c.checkpoint(ctr.id, leave_running=True)).startswith(b"CKPTIMG")
        (wdir / "go").touch()
        result = wait_for(lambda: (wdir / "result").exists() and (wdir / "result").read_text(),
                          20, "the verdict")
        assert result.strip() == "PASS", result
        c.delete(ctr.id, force=True)


def test_a_lock_held_elsewhere_fails_the_restart_cleanly(daemon: Daemon, tmp_short: Path) -> None:
    """The original keeps running (--leave-running) and holds its locks: a
    restart of its image cannot take them back, fails naming the lock, and
    leaves no container behind; the original's locks are untouched."""
    from workloads.workloads import build
    from ckptd_client.errors import FailedPrecondition
    wdir = tmp_short / "files"
    wdir.mkdir()
    with daemon.client() as c:
        ctr = c.run([str(build("files")), str(wdir)], cwd=str(wdir))
        try:
            wait_for(lambda: (wdir / "ready").exists(), 20, "ready")
            image = b"".join(c.checkpoint(ctr.id, leave_running=True))
            before = {x.id for x in c.list()}
            with pytest.raises(FailedPrecondition) as e:
                c.restart(iter([image]))
            assert "flock lock on" in str(e.value) and "append.log" in str(e.value), e.value
            assert {x.id for x in c.list()} == before
            (wdir / "go").touch()
            result = wait_for(lambda: (wdir / "result").exists()
                              and (wdir / "result").read_text(), 20, "the verdict")
            assert result.strip() == "PASS", result
        finally:
            c.delete(ctr.id, force=True)


@pytest.mark.parametrize("answer", ["none", "wrong count", "local file, none", "another caller"])
def test_no_confirmation_no_kill(daemon_factory, tmp_short: Path, answer: str) -> None:
    """A caller that never confirms it holds the whole image (it goes away
    after the last message, or confirms the wrong size), or a confirmation
    by someone else, does not get the processes killed: they are resumed,
    and the call fails saying so."""
    import grpc
    from ckptd.v1 import api_pb2_grpc
    from ckptd_client.transfer import IMAGE_OUT, hand_over
    daemon = daemon_factory("--socket-group", "nogroup")
    counter = tmp_short / "count"
    with daemon.client() as c:
        ctr = c.run([sys.executable, "-c", COUNTER_PY, str(counter)])
        grows(counter)
    request = pb.CheckpointRequest(id=ctr.id)
    image = open(tmp_short / "img", "w+b")
    if answer.startswith("local file"):
        request.local_output_token = hand_over(daemon.address, image.fileno(), IMAGE_OUT)
    received = 0
    with grpc.insecure_channel("unix:" + daemon.address) as ch:
        stub = api_pb2_grpc.CkptdStub(ch)
        call = stub.Checkpoint(request)
        for chunk in call:
            if chunk.HasField("complete"):
                done = chunk.complete
                assert done.confirm_token and done.confirm_timeout_seconds == 60
                assert done.bytes == (received or os.fstat(image.fileno()).st_size)
                break
            received += len(chunk.data)
        if answer == "none" or answer.startswith("local file"):
            call.cancel()   # gone without a word
            code, details = grpc.StatusCode.CANCELLED, ""
        else:
            if answer == "wrong count":
                stub.ConfirmCheckpoint(pb.CheckpointConfirmation(token=done.confirm_token,
                                                                 bytes=done.bytes - 1))
            else:
                r = as_nobody(daemon, "confirm", done.confirm_token, str(done.bytes))
                assert r.startswith("PERMISSION_DENIED"), r
                call.cancel()
            with pytest.raises(grpc.RpcError) as e:
                for _ in call:
                    pass
            code, details = e.value.code(), e.value.details()
        if answer == "wrong count":
            assert code == grpc.StatusCode.FAILED_PRECONDITION, details
            assert "resumed, not killed" in details
        wait_for(lambda: any(e.get("method") == "Checkpoint" for e in daemon.events("rpc")),
                 10, "the checkpoint call to end")
        # A token is good only while its checkpoint waits.
        with pytest.raises(grpc.RpcError) as spent:
            stub.ConfirmCheckpoint(pb.CheckpointConfirmation(token=done.confirm_token,
                                                             bytes=done.bytes))
        assert spent.value.code() == grpc.StatusCode.NOT_FOUND
    image.close()
    with daemon.client() as c:
        wait_for(lambda: c.status(ctr.id).container.state == pb.CONTAINER_STATE_RUNNING, 10,
                 "the container to run again")
    grows(counter)


CONFIRM_AS_NOBODY = r"""
import os, sys, grpc
from ckptd.v1 import api_pb2 as pb, api_pb2_grpc
address, token, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
# Made as root (grpc imports lazily, from where nobody may not read); it
# connects at its first call, as nobody: the daemon sees uid 65534.
ch = grpc.insecure_channel("unix:" + address)
stub = api_pb2_grpc.CkptdStub(ch)
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
try:
    stub.ConfirmCheckpoint(pb.CheckpointConfirmation(token=token, bytes=size))
    print("OK")
except grpc.RpcError as e:
    print(e.code().name, e.details())
ch.close()
"""


def as_nobody(daemon: Daemon, what: str, token: str, size: str) -> str:
    assert what == "confirm"
    r = subprocess.run([sys.executable, "-c", CONFIRM_AS_NOBODY, daemon.address, token, size],
                       capture_output=True, text=True, timeout=30)
    return r.stdout.strip() or r.stderr
