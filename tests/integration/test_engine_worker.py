"""The worker protocol (``python -m ckptd.engine.worker``) end to end, the
refusal of unsupported processes, and bad images that must fail cleanly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import require_root
from workloads.workloads import Workload, compare_views, outside_view

from ckptd.engine import api
from ckptd import errors as errors_mod
from ckptd.errors import ImageError, UnsupportedError

pytestmark = pytest.mark.root

IGNORE = ("stat.*", "status.SigQ", "status.voluntary*", "status.nonvoluntary*")


class WorkerDriver:
    """The daemon's side of one worker, reduced to what tests need."""

    def __init__(self, *, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL) -> None:
        self.sock, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckptd.engine.worker"], stdin=stdin, stdout=stdout,
            stderr=subprocess.PIPE, pass_fds=(theirs.fileno(),),
            env={**os.environ, "CKPTD_CONTROL_FD": str(theirs.fileno())})
        theirs.close()
        self.file = self.sock.makefile("rb")

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall((json.dumps(msg) + "\n").encode())

    def receive(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, f"worker closed the socket; stderr:\n{self.proc.stderr.read().decode()}"
        return json.loads(line)

    def until(self, key: str) -> dict[str, Any]:
        while True:
            msg = self.receive()
            if key in msg or "error" in msg:
                return msg

    def close(self) -> int:
        self.file.close()
        self.sock.close()
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def test_worker_checkpoint_and_restore(tmp_path: Path) -> None:
    require_root()
    image = tmp_path / "image"
    with Workload.start("counter", tmp_path / "wl") as w:
        w.wait_ready()
        before = outside_view(w.pid)
        with open(image, "wb") as out:
            d = WorkerDriver(stdout=out)
        d.send({"op": "checkpoint", "pid": w.pid, "cgroup": None, "freezer": None,
                "source": {"kind": "host"}})
        dumped = d.until("dumped")
        assert "dumped" in dumped, dumped
        assert dumped["dumped"]["bytes"] == image.stat().st_size
        d.send({"finish": "kill"})
        assert "frozen_ms" in d.until("finished")["finished"]
        assert d.close() == 0
        w.reap()

        with open(image, "rb") as src:
            r = WorkerDriver(stdin=src)
        r.send({"op": "restore", "target": "host"})
        need = r.until("need")["need"]
        assert need["pid"] == w.pid and need["source"]["kind"] == "host"
        r.send({"stub": None})
        restored = r.until("restored")
        assert restored["restored"]["pid"] == w.pid, restored
        assert r.close() == 0
        assert compare_views(before, outside_view(w.pid), IGNORE) == []
        w.go()
        assert w.result() == "PASS", w.output()


def test_worker_resumes_when_the_daemon_goes_away(tmp_path: Path) -> None:
    require_root()
    with Workload.start("counter", tmp_path / "wl") as w:
        w.wait_ready()
        d = WorkerDriver(stdout=subprocess.DEVNULL)
        d.send({"op": "checkpoint", "pid": w.pid, "cgroup": None, "freezer": None,
                "source": {"kind": "host"}})
        assert "dumped" in d.until("dumped")
        assert d.close() == 0          # no finish message: resume
        count = w.count()
        time.sleep(0.2)
        assert w.count() > count       # counting again
        w.go()
        assert w.result() == "PASS", w.output()


def test_unsupported_is_refused_and_left_running(tmp_path: Path) -> None:
    require_root()
    with Workload.start("socket_holder", tmp_path / "wl") as w:
        w.wait_ready()
        before = outside_view(w.pid)
        with pytest.raises(UnsupportedError) as info:
            api.checkpoint(w.pid, open(os.devnull, "wb"), kill=True)
        assert "socket" in str(info.value) and info.value.context["pid"] == w.pid
        assert info.value.context.get("fd") is not None
        assert compare_views(before, outside_view(w.pid), IGNORE) == []
        d = WorkerDriver(stdout=subprocess.DEVNULL)
        d.send({"op": "checkpoint", "pid": w.pid, "cgroup": None, "freezer": None,
                "source": {"kind": "host"}})
        err = d.until("dumped")["error"]
        assert err["kind"] == "unsupported" and "socket" in err["message"]
        assert d.close() == 1
        w.go()
        assert w.result() == "PASS", w.output()


def _image_of_sleep(tmp_path: Path) -> tuple[bytes, int]:
    proc = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.05)
        path = tmp_path / "image"
        with open(path, "wb") as f:
            api.checkpoint(proc.pid, f, kill=True)
        return path.read_bytes(), proc.pid
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


def _nothing_left(pid: int) -> None:
    try:
        os.waitpid(pid, 0)     # a host restore in process makes the task our child
    except ChildProcessError:
        pass
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} was left behind"


def test_bad_images_fail_cleanly(tmp_path: Path) -> None:
    require_root()
    import io
    raw, pid = _image_of_sleep(tmp_path)
    cases = {
        "truncated in the metadata": raw[:200],
        "truncated in the pages": raw[:len(raw) // 2],
        "no trailer": raw[:-60],
        "flipped byte in a page": raw[:-5000] + bytes([raw[-5000] ^ 0xFF]) + raw[-4999:],
        "flipped byte early": raw[:100] + bytes([raw[100] ^ 0x01]) + raw[101:],
        "wrong magic": b"XXXXXXXX" + raw[8:],
        "empty": b"",
    }
    for what, data in cases.items():
        with pytest.raises(ImageError):
            api.restore(io.BytesIO(data))
        _nothing_left(pid)
    # And the good one still restores (the failures left the pid free).
    restored = api.restore(io.BytesIO(raw))
    try:
        assert restored.pid == pid
    finally:
        os.kill(pid, 9)
        _nothing_left(pid)


def test_hostile_metadata_is_refused_before_anything(tmp_path: Path) -> None:
    require_root()
    import io
    from ckptd.engine import restore as restore_mod
    from ckptd.image import ImageReader, ImageWriter
    from ckptd.image.registry import RecordType
    from ckptd.v1 import image_pb2

    raw, pid = _image_of_sleep(tmp_path)
    meta, _, _ = restore_mod.read_metadata(ImageReader(io.BytesIO(raw)))

    def rewrite(change) -> bytes:
        origin, task = image_pb2.Origin(), image_pb2.Task()
        mm, files = image_pb2.Mm(), image_pb2.Files()
        for mine, theirs in ((origin, meta.origin), (task, meta.task), (mm, meta.mm),
                             (files, meta.files)):
            mine.CopyFrom(theirs)
        change(origin, task, mm, files)
        out = io.BytesIO()
        w = ImageWriter(out)
        w.write_header(ImageReader(io.BytesIO(raw)).read_header())
        w.write_message(RecordType.RECORD_TYPE_ORIGIN, origin)
        w.write_message(RecordType.RECORD_TYPE_TASK, task)
        w.write_message(RecordType.RECORD_TYPE_MM, mm)
        w.write_message(RecordType.RECORD_TYPE_FILES, files)
        w.close()
        return out.getvalue()

    def high_vma(o, t, mm, f):
        mm.vmas[0].start = 1 << 47
    def bad_fd(o, t, mm, f):
        f.fds[0].fd = 1 << 30
    def bad_pid(o, t, mm, f):
        t.pid = 1 << 30
    def other_vdso(o, t, mm, f):
        o.vdso_fingerprint = "0" * 64
    def high_brk(o, t, mm, f):
        mm.brk = 1 << 60

    for change in (high_vma, bad_fd, bad_pid, other_vdso, high_brk):
        with pytest.raises(ImageError):
            api.restore(io.BytesIO(rewrite(change)))
        _nothing_left(pid)


def test_changed_executable_and_taken_pid_are_refused(tmp_path: Path) -> None:
    require_root()
    import io
    import shutil
    exe = tmp_path / "mysleep"
    shutil.copy("/bin/sleep", exe)
    proc = subprocess.Popen([str(exe), "1000"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    other = None
    try:
        time.sleep(0.05)
        out = io.BytesIO()
        api.checkpoint(proc.pid, out, kill=True)
        proc.wait(5)
        raw = out.getvalue()
        with open(exe, "ab") as f:
            f.write(b"\0" * 4096)
        with pytest.raises(errors_mod.StateError) as info:
            api.restore(io.BytesIO(raw))
        assert str(exe) in str(info.value)
        _nothing_left(proc.pid)
        shutil.copy("/bin/sleep", exe)   # a new inode: still not the file we dumped
        with pytest.raises(errors_mod.StateError):
            api.restore(io.BytesIO(raw))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    # A pid that is taken by a live process is named in the error at once.
    other = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.05)
        out = io.BytesIO()
        with api.checkpointed(other.pid, out) as cp:
            cp.finish(kill=False)
        started = time.monotonic()
        with pytest.raises(errors_mod.StateError) as info:
            api.restore(io.BytesIO(out.getvalue()))
        assert str(other.pid) in str(info.value)
        assert time.monotonic() - started < 1
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(5)
