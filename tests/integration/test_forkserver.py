"""The fork server (ckptd/engine/forkserver.py): its protocol, the workers it
forks (they must start as a fresh ``python -m ckptd.engine.worker`` would),
and the daemon's use of it: workers are its children, an operation survives
its death, a dying worker is reported with its status, and nothing is left
once the daemon stops."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import Daemon, pid_gone, wait_for
from helpers import require_root

from ckptd import errors
from ckptd.containers.worker import ForkedWorker, WorkerPool
from ckptd.engine import forkserver

pytestmark = pytest.mark.root

ANSWER_TIMEOUT = 30.0   # a fresh server imports the engine before it answers
SYSCALL_RECVMSG = 47    # where an idle worker waits: recvmsg on its control socket


class RawServer:
    """A fork server driven by hand, as the daemon would."""

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckptd.engine.forkserver"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), start_new_session=True,
            env={**os.environ, forkserver.FD_ENV: str(theirs.fileno())})
        theirs.close()
        self.sock.settimeout(ANSWER_TIMEOUT)
        assert self.answer() == {"ready": self.proc.pid}

    def ask(self, payload: bytes | dict, fds: list[int] | None = None) -> dict:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        socket.send_fds(self.sock, [data], fds or [])
        return self.answer()

    def answer(self) -> dict:
        return json.loads(self.sock.recv(1 << 16))

    def fds(self) -> set[str]:
        return set(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def close(self) -> int:
        self.sock.close()
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def raw_server() -> Iterator[RawServer]:
    s = RawServer()
    try:
        yield s
    finally:
        s.close()


def fork_request(cwd: str, env: dict[str, str] | None = None, **over) -> dict:
    return {"op": "fork", "env": env if env is not None else dict(os.environ), "cwd": cwd,
            "affinity": sorted(os.sched_getaffinity(0)), "umask": 0o022, **over}


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def waiting_for_request(pid: int, fd: int = 3) -> bool:
    """The worker is set up and blocked reading its control socket, ``fd``."""
    fields = Path(f"/proc/{pid}/syscall").read_text().split()
    return fields[:2] == [str(SYSCALL_RECVMSG), hex(fd)]


def exited(pid: int, timeout: float = 10.0) -> None:
    fd = os.pidfd_open(pid)
    try:
        assert select.select([fd], [], [], timeout)[0], f"{pid} did not exit"
    finally:
        os.close(fd)


def children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except FileNotFoundError:
            pass   # a thread that ended meanwhile: its children are another's
    return out


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def fork_server_of(d: Daemon) -> int:
    """The daemon's fork server, once it has named itself (which it does
    before its imports)."""
    assert d.proc is not None
    pid = d.proc.pid
    found = wait_for(lambda: [c for c in children(pid) if comm(c) == "ckptd-forks"], 20,
                     "the daemon's fork server")
    assert len(found) == 1, f"fork servers of the daemon: {found}"
    return found[0]


def start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


# --- the protocol --------------------------------------------------------------------

def test_bad_requests_are_refused_and_the_server_carries_on(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        with raw_server() as s:
            before = s.fds()
            cases: list[tuple[bytes | dict, list[int], str]] = [
                (b"not json", [], "not JSON"),
                (b"[1, 2]", [], "not a JSON object"),
                ({"op": "dance"}, [], "unknown op"),
                ({"op": "reap", "pid": os.getpid()}, [], "not a worker"),
                ({"op": "reap", "pid": "one"}, [], "not a worker"),
                ({"op": "reap", "pid": 1}, [r], "takes no file descriptors"),
                (fork_request(str(tmp_path)), [r], "needs 4 file descriptors"),
                (fork_request(str(tmp_path), env={"A": 1}), [r, r, w, w], "env"),
                (fork_request("relative"), [r, r, w, w], "bad cwd"),
                (fork_request(str(tmp_path), affinity=[]), [r, r, w, w], "bad affinity"),
                (fork_request(str(tmp_path), umask=-1), [r, r, w, w], "bad umask"),
                (b"x" * (forkserver.MAX_REQUEST + 1), [w], "too large"),
            ]
            for payload, fds, says in cases:
                answer = s.ask(payload, fds)
                assert says in answer.get("error", ""), (payload[:80], answer)
                # What came with a refused request is not kept.
                assert s.fds() == before
            assert s.proc.poll() is None
            assert s.close() == 0
    finally:
        os.close(r)
        os.close(w)


def test_a_forked_worker_starts_like_a_fresh_one(tmp_path: Path) -> None:
    require_root()   # /proc/PID/syscall of another process
    fresh_ctl, fresh_theirs = socket.socketpair()
    fresh = subprocess.Popen([sys.executable, "-m", "ckptd.engine.worker"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             pass_fds=(fresh_theirs.fileno(),), start_new_session=True,
                             env={**os.environ, "CKPTD_CONTROL_FD": str(fresh_theirs.fileno())})
    fresh_fd = fresh_theirs.fileno()
    fresh_theirs.close()
    ctl, theirs = socket.socketpair()
    control_ino = os.fstat(theirs.fileno()).st_ino
    in_r, in_w = os.pipe()
    err_r, err_w = os.pipe()
    cpu = sorted(os.sched_getaffinity(0))[-1]
    try:
        with raw_server() as s, contextlib.closing(ctl):
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CKPTD_LOG_FORMAT": "console",
                   "PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd())}
            answer = s.ask(fork_request(str(tmp_path), env=env, affinity=[cpu], umask=0o027),
                           [theirs.fileno(), in_r, in_w, err_w])
            pid = answer["pid"]
            for fd in (in_r, err_w):
                os.close(fd)
            theirs.close()
            wait_for(lambda: waiting_for_request(pid), 10, "the forked worker to wait")
            wait_for(lambda: fresh.poll() is None and waiting_for_request(fresh.pid, fresh_fd), 30,
                     "the fresh worker to wait")
            mine, theirs_status = status(pid), status(fresh.pid)
            assert int(mine["PPid"]) == s.proc.pid
            assert os.getsid(pid) == pid, "a session of its own"
            assert sorted(os.listdir(f"/proc/{pid}/fd"), key=int) == ["0", "1", "2", "3"]
            assert os.stat(f"/proc/{pid}/fd/3").st_ino == control_ino
            assert os.readlink(f"/proc/{pid}/cwd") == str(tmp_path)
            assert mine["Umask"] == "0027"
            assert mine["Cpus_allowed_list"] == str(cpu)
            assert os.sched_getscheduler(pid) == os.SCHED_OTHER
            assert comm(pid) == "ckptd-worker"
            for key in ("SigBlk", "SigIgn", "SigCgt"):
                assert mine[key] == theirs_status[key], key
            assert int(mine["SigBlk"], 16) == 0
            # Still running: not reaped when asked.
            assert "still running" in s.ask({"op": "reap", "pid": pid})["error"]
            # It is a worker, and it took its environment from the request:
            # console log lines on the stderr we gave it.
            ctl.sendall(b'{"op": "dance"}\n')
            reply = json.loads(ctl.makefile("rb").readline())
            assert reply["error"]["kind"] == "usage" and "dance" in reply["error"]["message"]
            exited(pid)
            assert s.ask({"op": "reap", "pid": pid}) == {"pid": pid, "returncode": 1}
            assert pid_gone(pid)
            logged = os.read(err_r, 65536).decode()
            assert "worker_failed" in logged and not logged.lstrip().startswith("{")
            assert "not a worker" in s.ask({"op": "reap", "pid": pid})["error"]
    finally:
        for fd in (in_w, err_r):
            os.close(fd)
        ctl.close()
        fresh_ctl.close()
        fresh.wait(10)


def test_server_waits_for_its_workers_when_the_daemon_goes(tmp_path: Path) -> None:
    s = RawServer()
    ctl, theirs = socket.socketpair()
    try:
        pid = s.ask(fork_request(str(tmp_path)), [theirs.fileno(), 0, 1, 2])["pid"]
        theirs.close()
        s.sock.close()   # the daemon is gone; its worker is still busy
        with pytest.raises(subprocess.TimeoutExpired):
            s.proc.wait(0.3)
        ctl.close()      # the worker ends ...
        assert s.proc.wait(10) == 0   # ... and the server reaps it, then exits
        assert pid_gone(pid)
    finally:
        ctl.close()
        s.close()


# --- the daemon's side -----------------------------------------------------------------

def test_a_worker_that_dies_mid_operation_is_reported_with_its_status() -> None:
    pool = WorkerPool(count=0)
    server = pool.forks.pid
    try:
        with pool.take(image_in=True) as worker:
            assert isinstance(worker.proc, ForkedWorker)
            assert int(status(worker.proc.pid)["PPid"]) == server
            worker.request({"op": "restore", "target": "host"})   # waits for the image
            os.kill(worker.proc.pid, signal.SIGKILL)
            with pytest.raises(errors.SystemError_) as e:
                worker.receive(10)
            assert "exited with status -9" in str(e.value)
            assert worker.wait() == -signal.SIGKILL
        assert pid_gone(worker.proc.pid)
    finally:
        pool.close()
    assert server is not None and pid_gone(server)


def test_pool_falls_back_to_a_fresh_worker_when_the_server_is_gone() -> None:
    pool = WorkerPool(count=0)
    try:
        old = pool.forks.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        with pool.take(image_in=True) as worker:
            assert isinstance(worker.proc, subprocess.Popen), "started afresh"
            worker.request({"op": "dance"})
            assert "dance" in worker.receive(30)["error"]["message"]
            assert worker.wait() == 1
        new = pool.forks.pid
        assert new not in (None, old) and pid_gone(old)
        with pool.take(image_in=True) as worker:   # the new server forks again
            assert isinstance(worker.proc, ForkedWorker)
            assert int(status(worker.proc.pid)["PPid"]) == new
    finally:
        pool.close()


def test_daemon_workers_are_children_of_its_fork_server(daemon: Daemon,
                                                         tmp_short: Path) -> None:
    server = fork_server_of(daemon)
    spares = wait_for(lambda: [c for c in children(server) if comm(c) == "ckptd-worker"],
                      20, "a spare worker forked by the fork server")
    assert all(int(status(p)["PPid"]) == server for p in spares)
    image = tmp_short / "sleep.img"
    with daemon.client() as c:
        ctr = c.run(["/bin/sleep", "1000"])
        c.checkpoint_to_file(str(image), ref=ctr.id)
        new = c.restart_from_file(str(image))
        assert Path(f"/proc/{new.init_pid}/cmdline").read_bytes() == b"/bin/sleep\x001000\x00"
        c.kill(new.id, signal=9)
        c.delete(new.id)
        c.delete(ctr.id)
    started = daemon.events("worker_started")
    assert started and all(e["forked"] for e in started), started


def test_host_restore_is_handed_to_the_daemon(daemon: Daemon, tmp_short: Path) -> None:
    """The fork server is no subreaper: a process a worker restores with
    its original pid becomes the daemon's child, which reports its exit."""
    proc = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    pid = proc.pid
    image = tmp_short / "host.img"
    try:
        r = daemon.ckptctl("checkpoint", "--pid", str(pid), "-o", str(image))
        assert r.returncode == 0, r.stderr.decode() + daemon.log()
        assert proc.wait(10) == -signal.SIGKILL
        wait_for(lambda: pid_gone(pid), 10, "the old pid to be free")
        r = daemon.ckptctl("--json", "restart", "-i", str(image))
        assert r.returncode == 0, r.stderr.decode() + daemon.log()
        restored = json.loads(r.stdout)
        assert int(restored["init_pid"]) == pid
        assert daemon.proc is not None and int(status(pid)["PPid"]) == daemon.proc.pid
        with daemon.client() as c:
            c.kill(restored["id"], signal=signal.SIGTERM)
            wait_for(lambda: pid_gone(pid), 10, "the restored process to be reaped")
            assert c.status(restored["id"]).container.exit_signal == signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not pid_gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_operations_survive_the_fork_server_being_killed(daemon: Daemon,
                                                         tmp_short: Path) -> None:
    server = fork_server_of(daemon)
    os.kill(server, signal.SIGKILL)   # this daemon's own fork server, by pid
    with daemon.client() as c:
        for i in range(3):   # past the spares forked before, onto fresh or new forks
            ctr = c.run(["/bin/sleep", "1000"])
            image = tmp_short / f"sleep{i}.img"
            c.checkpoint_to_file(str(image), ref=ctr.id)
            new = c.restart_from_file(str(image))
            c.kill(new.id, signal=9)
            c.delete(new.id)
            c.delete(ctr.id)
    wait_for(lambda: pid_gone(server), 10, "the killed fork server to be reaped")
    assert fork_server_of(daemon) != server
    # Events, not daemon.log(): that is the log's tail, which a busy test outgrows.
    assert daemon.events("fork_server_replaced") and not daemon.events("worker_status_lost")


def test_nothing_is_left_after_the_daemon_stops(daemon: Daemon, tmp_short: Path) -> None:
    server = fork_server_of(daemon)
    wait_for(lambda: [c for c in children(server) if comm(c) == "ckptd-worker"], 20,
             "a spare worker")
    with daemon.client() as c:   # one operation, so a worker was used and reaped too
        ctr = c.run(["/bin/sleep", "1000"])
        c.checkpoint_to_file(str(tmp_short / "s.img"), ref=ctr.id, leave_running=True)
        c.kill(ctr.id, signal=9)
        c.delete(ctr.id)
    ours = {p: start_time(p) for p in [server, *children(server)]}
    daemon.stop()
    left = [p for p, t in ours.items() if not pid_gone(p) and start_time(p) == t]
    assert not left, f"still there after the daemon stopped: {left}"


def test_a_forked_worker_reads_like_a_fresh_one_in_ps(daemon: Daemon) -> None:
    server = fork_server_of(daemon)
    workers = wait_for(lambda: [c for c in children(server) if comm(c) == "ckptd-worker"], 20,
                       "a spare worker")
    args = Path(f"/proc/{workers[0]}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    assert args[-2:] == [b"-m", b"ckptd.engine.worker"], args
    server_args = Path(f"/proc/{server}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    assert server_args[-2:] == [b"-m", b"ckptd.engine.forkserver"], "the server's own is kept"
    # And the worker still works: a checkpoint and restart go through forked workers.
    with daemon.client() as c:
        ctr = c.run(["/bin/sleep", "1000"])
        image = b"".join(c.checkpoint(ctr.id, leave_running=True))
        assert image.startswith(b"CKPTIMG")
        c.kill(ctr.id, signal=9)
        c.delete(ctr.id)
