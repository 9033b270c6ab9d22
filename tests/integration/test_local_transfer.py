"""Checkpoint into and restart from a local file without streaming: the client
hands its open file to the daemon's side channel ``<socket>.fd`` and the
engine writes or reads it itself. Same images, same semantics as streaming;
tokens single-use and bound to the caller; no descriptor left in the daemon."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from ckptd.v1 import api_pb2 as pb
from ckptd.v1 import api_pb2_grpc
from ckptd_client.errors import NotFound
from ckptd_client.transfer import IMAGE_IN, IMAGE_OUT, hand_over
from harness import Daemon, wait_for
from test_checkpoint_daemon import COUNTER_PY, grows, read_count

# Enough touched memory that a dump lasts several progress reports.
BIG_PY = "import time; b = bytearray(b'x') * (384 << 20); open(__import__('sys').argv[1], 'w').close(); time.sleep(1000)"


def daemon_fds(d: Daemon) -> int:
    """The daemon's open descriptors, once closed connections and restarted
    spare workers have settled (the count holds still for half a second)."""
    assert d.proc is not None
    counts: list[int] = []

    def settled() -> bool:
        counts.append(len(os.listdir(f"/proc/{d.proc.pid}/fd")))
        return len(counts) > 10 and len(set(counts[-10:])) == 1
    wait_for(settled, 20, "the daemon's descriptors to settle", interval=0.05)
    return counts[-1]


def test_side_channel_socket(daemon_factory) -> None:
    d = daemon_factory("--socket-group", "nogroup")
    side = Path(d.address + ".fd")
    st = side.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, 65534), "same owner, group and mode as the socket"
    d.stop()
    assert not side.exists() and not d.socket.exists()


def test_checkpoint_and_restart_through_local_files(daemon: Daemon, tmp_short: Path) -> None:
    counter = tmp_short / "count"
    image = tmp_short / "ctr.img"
    with daemon.client() as c:
        ctr = c.run([sys.executable, "-c", COUNTER_PY, str(counter)], name="counter")
        grows(counter)
    r = daemon.ckptctl("checkpoint", ctr.id, "-o", str(image), timeout=120)
    assert r.returncode == 0, r.stderr.decode() + daemon.log()
    assert daemon.events("checkpoint_done")[-1]["local_file"] is True
    assert stat.S_IMODE(image.stat().st_mode) == 0o600
    assert [p.name for p in tmp_short.iterdir() if p.name.endswith(".partial")] == []
    stopped_at = read_count(counter)[0]
    r = daemon.ckptctl("--json", "image", "inspect", str(image))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["trailer"]

    r = daemon.ckptctl("--json", "restart", "-i", str(image), "--name", "counter2", timeout=60)
    assert r.returncode == 0, r.stderr.decode() + daemon.log()
    assert daemon.events("restart_done")[-1]["local_file"] is True
    with daemon.client() as c:
        assert c.status("counter2").container.state == pb.CONTAINER_STATE_RUNNING
        n = wait_for(lambda: read_count(counter)[0] > stopped_at and read_count(counter)[0],
                     10, "the restored counter to go on")
        assert n < stopped_at + 5000 and read_count(counter)[2] == "ok"
        c.kill("counter2", signal=9)
        c.delete("counter2")
        c.delete(ctr.id)


def test_same_image_as_streaming_and_open_files(daemon: Daemon, tmp_short: Path) -> None:
    local, streamed = tmp_short / "local.img", tmp_short / "streamed.img"
    with daemon.client() as c, daemon.client(local_files=False) as s:
        ctr = c.run(["sleep", "1000"])
        with open(local, "wb") as f:   # an open file object, as `-o -` to a file gives
            f.write(b"")
            size = c.checkpoint_to_file(f, ref=ctr.id, leave_running=True)
        assert size == local.stat().st_size > 0
        assert s.checkpoint_to_file(streamed, ref=ctr.id, leave_running=True) > 0
        assert [e["local_file"] for e in daemon.events("checkpoint_done")] == [True, False]

        def shape(path: Path) -> dict:
            r = daemon.ckptctl("--json", "image", "inspect", str(path))
            assert r.returncode == 0, r.stderr
            trailer = json.loads(r.stdout)["trailer"]
            return {k: v for k, v in trailer.items() if k != "digest"}
        assert shape(local) == shape(streamed), "the same records, whichever way"

        c.kill(ctr.id, signal=9)
        seen: list[int] = []
        with open(streamed, "rb") as f:
            new = c.restart_from_file(f, progress=seen.append)
        assert seen[-1] == streamed.stat().st_size
        new2 = s.restart_from_file(local)
        assert [e["local_file"] for e in daemon.events("restart_done")] == [True, False]
        for x in (new, new2):
            assert c.status(x.id).container.state == pb.CONTAINER_STATE_RUNNING
            c.kill(x.id, signal=9)
            c.delete(x.id)
        c.delete(ctr.id)


def test_forced_streaming_by_environment(daemon: Daemon, tmp_short: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_short / "s.img"
    with daemon.client() as c:
        ctr = c.run(["sleep", "1000"])
    monkeypatch.setenv("CKPTD_LOCAL_FILES", "0")
    r = daemon.ckptctl("checkpoint", ctr.id, "-o", str(image), timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    r = daemon.ckptctl("--json", "restart", "-i", str(image), timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert daemon.events("checkpoint_done")[-1]["local_file"] is False
    assert daemon.events("restart_done")[-1]["local_file"] is False
    with daemon.client() as c:
        new = json.loads(r.stdout)["id"]
        c.kill(new, signal=9)
        c.delete(new)
        c.delete(ctr.id)


def test_progress_shows_in_status(daemon: Daemon, tmp_short: Path) -> None:
    ready, image = tmp_short / "ready", tmp_short / "big.img"
    with daemon.client() as c:
        ctr = c.run([sys.executable, "-c", BIG_PY, str(ready)])
        wait_for(ready.exists, 30, "the big process to fill its memory")
        seen: list[pb.Operation] = []
        done = threading.Event()

        def watch() -> None:
            with daemon.client() as w:
                while not done.is_set():
                    seen.extend(w.status(ctr.id).operations)
                    time.sleep(0.005)
        t = threading.Thread(target=watch)
        t.start()
        reported: list[int] = []
        try:
            size = c.checkpoint_to_file(image, ref=ctr.id, progress=reported.append)
        finally:
            done.set()
            t.join()
        assert daemon.events("checkpoint_done")[-1]["local_file"] is True
        moving = {op.bytes_done for op in seen if op.kind == pb.OPERATION_KIND_CHECKPOINT}
        assert any(0 < b < size for b in moving), f"bytes_done in Status: {sorted(moving)[:5]}"
        assert reported[-1] == size == image.stat().st_size
        c.delete(ctr.id)


CALL_AS = """
import os, sys
import grpc, grpc._channel, grpc._interceptor, grpc._utilities  # grpc imports these lazily
from ckptd.v1 import api_pb2 as pb, api_pb2_grpc
address, token, uid = sys.argv[1], sys.argv[2], int(sys.argv[3])
if uid:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(uid)
with grpc.insecure_channel("unix:" + address) as ch:
    stub = api_pb2_grpc.CkptdStub(ch)
    try:
        for _ in stub.Checkpoint(pb.CheckpointRequest(id="any", local_output_token=token)):
            pass
        print("OK")
    except grpc.RpcError as e:
        print(e.code().name, e.details())
"""


def test_tokens_are_single_use_and_bound_to_the_caller(daemon_factory,
                                                       tmp_short: Path) -> None:
    d = daemon_factory("--socket-group", "nogroup")
    image = tmp_short / "t.img"
    with d.client() as c:
        ctr = c.run(["sleep", "1000"])
    stub_channel = grpc.insecure_channel("unix:" + d.address)
    stub = api_pb2_grpc.CkptdStub(stub_channel)

    def checkpoint(token: str) -> str:
        try:
            request = pb.CheckpointRequest(id=ctr.id, leave_running=True,
                                           local_output_token=token)
            for chunk in stub.Checkpoint(request):
                # The local path carries only the last message: the image is complete.
                assert chunk.HasField("complete") and not chunk.data, "no image data"
                assert not chunk.complete.confirm_token, "a tree left running waits for nothing"
            return "OK"
        except grpc.RpcError as e:
            return f"{e.code().name} {e.details()}"

    def from_another(token: str, uid: int) -> str:
        r = subprocess.run([sys.executable, "-c", CALL_AS, d.address, token, str(uid)],
                           capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode()

    with open(image, "wb") as f:
        token = hand_over(d.address, f.fileno(), IMAGE_OUT)
        assert token and checkpoint(token) == "OK"
        assert image.stat().st_size > 0
        assert checkpoint(token).startswith("INVALID_ARGUMENT unknown local file token")
        # Another process of the same uid, then another uid: refused.
        assert from_another(hand_over(d.address, f.fileno(), IMAGE_OUT), 0).startswith(
            "PERMISSION_DENIED the local file token was handed over by another process")
        assert from_another(hand_over(d.address, f.fileno(), IMAGE_OUT), 65534).startswith(
            "PERMISSION_DENIED")
        # A file opened for reading cannot be handed over for writing; a pipe not at all.
        with open(image, "rb") as ro, pytest.raises(ValueError, match="not open for writing"):
            hand_over(d.address, ro.fileno(), IMAGE_OUT)
        r, w = os.pipe()
        try:
            with pytest.raises(ValueError, match="regular file"):
                hand_over(d.address, w, IMAGE_OUT)
        finally:
            os.close(r)
            os.close(w)
        # A token for reading is no token for writing.
        with open(image, "rb") as ro:
            assert checkpoint(hand_over(d.address, ro.fileno(), IMAGE_IN)).startswith(
                "INVALID_ARGUMENT the local file token was handed over for reading")
    stub_channel.close()
    with d.client() as c:
        assert c.status(ctr.id).container.state == pb.CONTAINER_STATE_RUNNING
        c.delete(ctr.id, force=True)


def test_no_descriptor_left_in_the_daemon(daemon: Daemon, tmp_short: Path) -> None:
    image = tmp_short / "leak.img"

    def round_trip() -> None:
        with daemon.client() as c:
            ctr = c.run(["sleep", "1000"])
            c.checkpoint_to_file(image, ref=ctr.id)
            new = c.restart_from_file(image)
            c.delete(new.id, force=True)
            c.delete(ctr.id)
            # Refused calls close what they took (expiry is the unit tests' part).
            with pytest.raises(NotFound):
                c.checkpoint_to_file(tmp_short / "never.img", ref="no-such")
            assert not (tmp_short / "never.img").exists()
            with open(image, "rb") as f:
                token = hand_over(daemon.address, f.fileno(), IMAGE_IN)
                stub = api_pb2_grpc.CkptdStub(c._channel)
                with pytest.raises(grpc.RpcError):
                    request = pb.CheckpointRequest(id="x", local_output_token=token)
                    for _ in stub.Checkpoint(request):
                        pass

    round_trip()   # spare workers, gRPC threads: everything lazy exists now
    before = daemon_fds(daemon)
    for _ in range(3):
        round_trip()
    assert daemon_fds(daemon) == before


def test_interrupted_local_checkpoint_leaves_the_target_running(daemon: Daemon,
                                                                tmp_short: Path) -> None:
    ready, image = tmp_short / "ready", tmp_short / "cut.img"
    with daemon.client() as c:
        ctr = c.run([sys.executable, "-c", BIG_PY, str(ready)])
        wait_for(ready.exists, 30, "the big process to fill its memory")
        proc = subprocess.Popen([sys.executable, "-m", "ckptd_client.cli", "--address", daemon.address, "checkpoint", ctr.id,
                                 "-o", str(image)], stderr=subprocess.PIPE)
        wait_for(lambda: c.operation(ctr.id, pb.OPERATION_KIND_CHECKPOINT), 30,
                 "the checkpoint to start")
        proc.send_signal(2)   # Ctrl-C while the engine writes the file
        _, err = proc.communicate(timeout=30)
        assert proc.returncode != 0, err
        wait_for(lambda: c.operation(ctr.id, pb.OPERATION_KIND_CHECKPOINT) is None, 30,
                 "the checkpoint to end")
        assert c.status(ctr.id).container.state == pb.CONTAINER_STATE_RUNNING
        assert list(tmp_short.glob("*.img*")) == [], "no image, not even a partial one"
        assert daemon.events("checkpoint_done") == []
        end = wait_for(lambda: [e for e in daemon.events("rpc")
                                if e.get("method") == "Checkpoint"], 10, "the call to end")
        assert "went away" in end[-1]["error"], "the daemon noticed, and resumed the target"
        c.delete(ctr.id, force=True)
