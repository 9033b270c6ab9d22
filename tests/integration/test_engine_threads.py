"""Multi-threaded processes through the engine, in process, target host:
checkpoint (kill) and restore with every thread's original tid, or checkpoint
and leave running; the workload must say PASS afterwards, and what /proc shows
of it (every thread by tid: comm, mask, creds, affinity) must be the same."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from helpers import require_root
from harness import RESTORE_VIEW_IGNORE, kill_and_reap
from workloads.workloads import Workload, compare_views, outside_view

from ckptd.engine import api

pytestmark = pytest.mark.root

IGNORE = RESTORE_VIEW_IGNORE
WORKLOADS = ["threads", "pythreads"]


_reap = kill_and_reap


def _tids(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def _ready_tids(info: dict[str, str]) -> list[int]:
    return sorted(int(t) for t in info["tids"].split(","))


@pytest.mark.parametrize("name", WORKLOADS)
def test_threads_survive_kill_and_restore(name: str, tmp_path: Path, request) -> None:
    require_root()
    with Workload.start(name, tmp_path / "wl") as w:
        info = w.wait_ready()
        assert _tids(w.pid) == _ready_tids(info)
        before = outside_view(w.pid)
        image = io.BytesIO()
        api.checkpoint(w.pid, image, kill=True)
        w.reap()
        restored = api.restore(io.BytesIO(image.getvalue()))
        assert restored.pid == w.pid
        request.addfinalizer(lambda: _reap(restored.pid))
        assert _tids(w.pid) == _ready_tids(info)
        diffs = compare_views(before, outside_view(w.pid), IGNORE)
        w.go()
        assert w.result() == "PASS", w.output()
        assert diffs == []


@pytest.mark.parametrize("name", WORKLOADS)
def test_threads_keep_running_after_a_checkpoint(name: str, tmp_path: Path) -> None:
    require_root()
    with Workload.start(name, tmp_path / "wl") as w:
        info = w.wait_ready()
        before = outside_view(w.pid)
        with open(os.devnull, "wb") as sink:
            api.checkpoint(w.pid, sink, kill=False)
        assert _tids(w.pid) == _ready_tids(info)
        for tid in _tids(w.pid):
            with open(f"/proc/{w.pid}/task/{tid}/status") as f:
                assert "TracerPid:\t0\n" in f.read()
        diffs = compare_views(before, outside_view(w.pid), IGNORE)
        w.go()
        assert w.result() == "PASS", w.output()
        assert diffs == []


def test_threads_survive_two_restores(tmp_path: Path, request) -> None:
    """A restored multi-threaded process can be checkpointed and restored again."""
    require_root()
    with Workload.start("threads", tmp_path / "wl") as w:
        info = w.wait_ready()
        image = io.BytesIO()
        api.checkpoint(w.pid, image, kill=True)
        w.reap()
        api.restore(io.BytesIO(image.getvalue()))
        request.addfinalizer(lambda: _reap(w.pid))
        again = io.BytesIO()
        # Restored in process, it is our child as well as our tracee: the
        # kill collects it, freeing its pid.
        api.checkpoint(w.pid, again, kill=True)
        api.restore(io.BytesIO(again.getvalue()))
        assert _tids(w.pid) == _ready_tids(info)
        w.go()
        assert w.result() == "PASS", w.output()


CHURN = r"""
import os, sys, threading, time
d = sys.argv[1]
count = [0]
def short():
    count[0] += 1
    time.sleep(0.001)
def keep():
    while True:
        time.sleep(0.002)
threading.Thread(target=keep, daemon=True).start()
open(os.path.join(d, "ready"), "w").close()
while not os.path.exists(os.path.join(d, "go")):
    ts = [threading.Thread(target=short) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
before = count[0]
time.sleep(0.05)
for _ in range(20):
    t = threading.Thread(target=short)
    t.start()
    t.join()
ok = count[0] == before + 20
open(os.path.join(d, "result"), "w").write("PASS" if ok else f"FAIL: {count[0]} {before}")
"""


def test_threads_that_come_and_go_while_seized(tmp_path: Path, request) -> None:
    """A process not frozen keeps making and ending threads while it is
    seized: every checkpoint gets a consistent set, and it carries on after
    being left running and after a restore."""
    import subprocess
    import sys
    import time
    require_root()
    proc = subprocess.Popen([sys.executable, "-c", CHURN, str(tmp_path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    request.addfinalizer(lambda: _reap(proc.pid))
    deadline = time.monotonic() + 10
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    for _ in range(5):
        with open(os.devnull, "wb") as sink:
            api.checkpoint(proc.pid, sink, kill=False)
        time.sleep(0.02)
    image = io.BytesIO()
    api.checkpoint(proc.pid, image, kill=True)
    proc.wait(5)
    api.restore(io.BytesIO(image.getvalue()))
    time.sleep(0.1)
    (tmp_path / "go").touch()
    deadline = time.monotonic() + 10
    while not (tmp_path / "result").exists():
        assert time.monotonic() < deadline, "no verdict"
        time.sleep(0.01)
    assert (tmp_path / "result").read_text() == "PASS"


def test_exited_main_thread_is_refused_and_left_running() -> None:
    """pthread_exit in main leaves a zombie leader with live threads: refused
    before anything is touched, and the threads keep running."""
    import subprocess
    import sys
    import time
    from ckptd.errors import UnsupportedError
    require_root()
    code = ("import threading, time, ctypes; "
            "threading.Thread(target=time.sleep, args=(100,)).start(); time.sleep(0.1); "
            "ctypes.CDLL(None).pthread_exit(None)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        with pytest.raises(UnsupportedError) as info:
            api.checkpoint(proc.pid, io.BytesIO(), kill=True)
        assert "main thread" in str(info.value)
        assert proc.poll() is None and len(_tids(proc.pid)) == 2
    finally:
        proc.kill()
        proc.wait(5)
