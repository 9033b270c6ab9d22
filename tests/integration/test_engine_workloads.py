"""Checkpoint (with kill) and restore, with the original pid in the host PID
namespace, of each self-checking workload: it must say PASS afterwards, and
what /proc shows of it must be the same before and after."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from helpers import require_root
from harness import RESTORE_VIEW_IGNORE, kill_and_reap
from workloads.workloads import Workload, compare_views, outside_view

from ckptd.engine import api

pytestmark = pytest.mark.root

IGNORE = RESTORE_VIEW_IGNORE


_reap = kill_and_reap


def checkpoint_restore(w: Workload, tmp_path: Path, request, ignore: tuple[str, ...] = ()) -> list[str]:
    before = outside_view(w.pid)
    image = tmp_path / "image"
    with open(image, "wb") as f:
        dumped = api.checkpoint(w.pid, f, kill=True)
    assert dumped.bytes == image.stat().st_size
    w.reap()
    with open(image, "rb") as f:
        restored = api.restore(f)
    assert restored.pid == w.pid
    # Restored in process: the task is now our child; reap it when it ends.
    request.addfinalizer(lambda: _reap(restored.pid))
    return compare_views(before, outside_view(w.pid), IGNORE + ignore)


@pytest.mark.parametrize("name", ["regs", "regs_static", "memory", "files", "signals",
                                  "timers", "seccomp_rseq", "counter"])
def test_workload_survives(name: str, tmp_path: Path, request) -> None:
    require_root()
    with Workload.start(name, tmp_path / "wl") as w:
        w.wait_ready()
        diffs = checkpoint_restore(w, tmp_path, request)
        w.go()
        assert w.result() == "PASS", w.output()
        assert diffs == []


def test_limits_and_creds_survive(tmp_path: Path, request) -> None:
    require_root()
    with Workload.start("limits_creds", tmp_path / "wl") as w:
        w.wait_ready()
        diffs = checkpoint_restore(w, tmp_path, request)
        w.go()
        assert w.result() == "PASS", w.output()
        assert diffs == []


def test_sleep_keeps_sleeping(tmp_path: Path) -> None:
    require_root()
    import subprocess
    proc = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.05)
        before = outside_view(proc.pid)
        with open(tmp_path / "image", "wb") as f:
            api.checkpoint(proc.pid, f, kill=True)
        proc.wait(5)
        with open(tmp_path / "image", "rb") as f:
            restored = api.restore(f)
        assert restored.pid == proc.pid
        time.sleep(0.05)
        after = outside_view(proc.pid)
        assert compare_views(before, after, IGNORE) == []
        assert after["stat"]["state"] in ("S",) if "state" in after["stat"] else True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        _reap(proc.pid)


def test_session_leader_stays_leader(tmp_path: Path, request) -> None:
    require_root()
    import subprocess
    proc = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    request.addfinalizer(lambda: _reap(proc.pid))
    time.sleep(0.05)
    with open(tmp_path / "image", "wb") as f:
        api.checkpoint(proc.pid, f, kill=True)
    proc.wait(5)
    with open(tmp_path / "image", "rb") as f:
        api.restore(f)
    assert os.getsid(proc.pid) == proc.pid and os.getpgid(proc.pid) == proc.pid


SHARED_ANON = r"""
import mmap, os, sys, time
d = sys.argv[1]
m = mmap.mmap(-1, 4 << 20)                    # MAP_SHARED | MAP_ANONYMOUS
for i in range(0, 4 << 20, 8192):
    m[i:i + 8] = i.to_bytes(8, "little")
open(os.path.join(d, "ready"), "w").close()
while not os.path.exists(os.path.join(d, "go")):
    time.sleep(0.01)
ok = all(m[i:i + 8] == i.to_bytes(8, "little") for i in range(0, 4 << 20, 8192))
ok = ok and m[4096:4104] == bytes(8)
open(os.path.join(d, "result"), "w").write("PASS" if ok else "FAIL")
"""


def test_shared_anonymous_memory_survives(tmp_path: Path, request) -> None:
    require_root()
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", SHARED_ANON, str(tmp_path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    request.addfinalizer(lambda: _reap(proc.pid))
    deadline = time.monotonic() + 10
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    before = outside_view(proc.pid)
    with open(tmp_path / "image", "wb") as f:
        api.checkpoint(proc.pid, f, kill=True)
    proc.wait(5)
    with open(tmp_path / "image", "rb") as f:
        api.restore(f)
    assert compare_views(before, outside_view(proc.pid), IGNORE) == []
    (tmp_path / "go").touch()
    deadline = time.monotonic() + 10
    while not (tmp_path / "result").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert (tmp_path / "result").read_text() == "PASS"


def test_relative_sleep_keeps_its_remaining_time(request) -> None:
    """`sleep` sits in a relative nanosleep (-ERESTART_RESTARTBLOCK): the new
    task re-issues it with the remaining time, so it ends when it would have."""
    require_root()
    import io
    import subprocess
    proc = subprocess.Popen(["sleep", "1.2"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    request.addfinalizer(lambda: _reap(proc.pid))
    started = time.monotonic()
    time.sleep(0.4)
    image = io.BytesIO()
    api.checkpoint(proc.pid, image, kill=True)
    proc.wait(5)
    api.restore(io.BytesIO(image.getvalue()))
    _, status = os.waitpid(proc.pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert 1.15 < time.monotonic() - started < 1.6
