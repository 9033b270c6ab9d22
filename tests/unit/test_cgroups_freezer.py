"""Both freezer backends against a fake cgroupfs tree in a temp dir.

The "kernel" here is a thread that plays the kernel's part: it watches the
request file and, after a delay, flips the answer (cgroup.events for v2,
freezer.state FREEZING -> FROZEN for v1). No privilege needed.
"""

from __future__ import annotations

import errno
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptd.kernel import cgroup1, cgroupfs
from ckptd.kernel.cgroup1 import FreezerV1
from ckptd.kernel.cgroup2 import RECHECK, FreezerV2
from ckptd.kernel.cgroupfs import FreezerState
from ckptd.kernel.freezer import make_freezer, open_freezer

KERNEL_DELAY = 0.15   # how long the fake kernel takes to freeze or thaw


def _write(path: Path, text: str) -> None:
    path.write_text(text)


# --- cgroup v2 ---------------------------------------------------------------

def _events(populated: int, frozen: int) -> str:
    return f"populated {populated}\nfrozen {frozen}\n"


@pytest.fixture
def v2_tree(tmp_path: Path) -> tuple[FreezerV2, Path]:
    mount = tmp_path / "unified"
    cg = mount / "ckptd" / "c1"
    cg.mkdir(parents=True)
    _write(mount / "cgroup.controllers", "cpu memory pids\n")
    _write(cg / "cgroup.freeze", "0\n")
    _write(cg / "cgroup.events", _events(1, 0))
    _write(cg / "cgroup.procs", "100\n200\n")
    _write(cg / "cgroup.threads", "100\n101\n200\n")
    _write(cg / "cgroup.kill", "")
    return FreezerV2(mount), cg


class FakeKernelV2:
    """Answers cgroup.freeze in cgroup.events after ``delay``; ``stuck`` never does."""

    def __init__(self, cg: Path, delay: float = KERNEL_DELAY, stuck: bool = False) -> None:
        self.cg, self.delay, self.stuck = cg, delay, stuck
        self._seen = (cg / "cgroup.freeze").read_text().strip()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeKernelV2:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        seen = self._seen
        while not self._stop.wait(0.005):
            wanted = (self.cg / "cgroup.freeze").read_text().strip()
            if wanted != seen and wanted:
                seen = wanted
                if not self.stuck and not self._stop.wait(self.delay):
                    _write(self.cg / "cgroup.events", _events(1, int(wanted)))


def test_v2_lists_tasks(v2_tree):
    freezer, cg = v2_tree
    assert freezer.procs(cg) == [100, 200]
    assert freezer.threads(cg) == [100, 101, 200]
    assert freezer.join_file(cg) == cg / "cgroup.procs"


def test_v2_freeze_waits_for_the_kernel(v2_tree):
    freezer, cg = v2_tree
    with FakeKernelV2(cg):
        began = time.monotonic()
        freezer.freeze(cg, timeout=5)
        took = time.monotonic() - began
        assert freezer.state(cg) == FreezerState.FROZEN
        # Returned once the kernel flipped "frozen", not before and not long after.
        assert KERNEL_DELAY <= took < KERNEL_DELAY + RECHECK + 0.5
        freezer.thaw(cg, timeout=5)
        assert freezer.state(cg) == FreezerState.THAWED
    assert (cg / "cgroup.freeze").read_text().strip() == "0"


def test_v2_state_freezing_while_requested(v2_tree):
    freezer, cg = v2_tree
    _write(cg / "cgroup.freeze", "1")
    assert freezer.state(cg) == FreezerState.FREEZING


def test_v2_freeze_is_idempotent(v2_tree):
    freezer, cg = v2_tree
    _write(cg / "cgroup.freeze", "1")
    _write(cg / "cgroup.events", _events(1, 1))
    freezer.freeze(cg, timeout=0.1)    # no kernel thread: already frozen
    assert freezer.state(cg) == FreezerState.FROZEN


def test_v2_freeze_timeout_thaws_back(v2_tree):
    freezer, cg = v2_tree
    with FakeKernelV2(cg, stuck=True):
        with pytest.raises(TimeoutError) as info:
            freezer.freeze(cg, timeout=0.2)
    assert info.value.errno == errno.ETIMEDOUT
    assert str(cg) in str(info.value)
    assert (cg / "cgroup.freeze").read_text().strip() == "0"   # thawed back
    assert freezer.state(cg) == FreezerState.THAWED


def test_v2_kill_all_and_wait_empty(v2_tree):
    freezer, cg = v2_tree
    freezer.kill_all(cg)
    assert (cg / "cgroup.kill").read_text().strip() == "1"
    timer = threading.Timer(KERNEL_DELAY, _write, (cg / "cgroup.events", _events(0, 0)))
    timer.start()
    try:
        freezer.wait_empty(cg, timeout=5)
    finally:
        timer.cancel()
    with pytest.raises(TimeoutError):
        _write(cg / "cgroup.events", _events(1, 0))
        freezer.wait_empty(cg, timeout=0.1)


def test_v2_remove(v2_tree):
    freezer, cg = v2_tree
    for child in cg.iterdir():      # the real kernel's files vanish with the dir
        child.unlink()
    freezer.remove(cg, timeout=1)
    assert not cg.exists()
    freezer.remove(cg, timeout=1)   # already gone: fine


# --- cgroup v1 ---------------------------------------------------------------

@pytest.fixture
def v1_tree(tmp_path: Path) -> tuple[FreezerV1, Path]:
    mount = tmp_path / "freezer"
    cg = mount / "ckptd" / "c1"
    cg.mkdir(parents=True)
    _write(cg / "freezer.state", "THAWED\n")
    _write(cg / "cgroup.procs", "100\n")
    _write(cg / "tasks", "100\n101\n")
    return FreezerV1(mount), cg


class FakeKernelV1:
    """Plays v1's freezer.state: writing FROZEN reads back FREEZING until
    ``delay`` has passed (never, if ``stuck``); writing FROZEN again while
    FREEZING retries without starting over, and is what it takes to get
    past a freeze that stopped short (``short`` retries needed); THAWED is
    immediate."""

    def __init__(self, delay: float = KERNEL_DELAY, stuck: bool = False, short: int = 0) -> None:
        self.delay, self.stuck, self.short = delay, stuck, short
        self.writes: list[str] = []
        self._timer: threading.Timer | None = None

    def write_control(self, path: Path, text: str) -> None:
        self.writes.append(text)
        if path.name != "freezer.state":
            cgroupfs.write_control(path, text)
            return
        state = path.read_text().strip()
        if text == "FROZEN" and state == "FREEZING":
            if self.short:
                self.short -= 1   # this retry froze some of what was left
                if not self.short and not self.stuck:
                    self._start(path)
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if text == "FROZEN" and state != "FROZEN":
            _write(path, "FREEZING\n")
            if not self.stuck and not self.short:
                self._start(path)
        else:
            _write(path, text + "\n")

    def _start(self, path: Path) -> None:
        self._timer = threading.Timer(self.delay, _write, (path, "FROZEN\n"))
        self._timer.start()


@pytest.fixture
def kernel_v1(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernelV1]:
    kernel = FakeKernelV1()
    monkeypatch.setattr(cgroup1, "write_control", kernel.write_control)
    yield kernel
    if kernel._timer is not None:
        kernel._timer.cancel()


def test_v1_lists_tasks(v1_tree):
    freezer, cg = v1_tree
    assert freezer.procs(cg) == [100]
    assert freezer.threads(cg) == [100, 101]


def test_v1_freeze_waits_through_freezing(v1_tree, kernel_v1):
    freezer, cg = v1_tree
    began = time.monotonic()
    freezer.freeze(cg, timeout=5)
    took = time.monotonic() - began
    assert freezer.state(cg) == FreezerState.FROZEN
    assert KERNEL_DELAY <= took < KERNEL_DELAY + 0.5
    freezer.freeze(cg, timeout=0.1)     # idempotent
    freezer.thaw(cg, timeout=1)
    assert freezer.state(cg) == FreezerState.THAWED


def test_v1_state_freezing(v1_tree, kernel_v1):
    freezer, cg = v1_tree
    kernel_v1.stuck = True
    cgroup1.write_control(cg / "freezer.state", "FROZEN")
    assert freezer.state(cg) == FreezerState.FREEZING


def test_v1_freeze_timeout_thaws_back(v1_tree, kernel_v1):
    freezer, cg = v1_tree
    kernel_v1.stuck = True
    with pytest.raises(TimeoutError) as info:
        freezer.freeze(cg, timeout=0.2)
    assert info.value.errno == errno.ETIMEDOUT
    assert kernel_v1.writes[-1] == "THAWED" and set(kernel_v1.writes[:-1]) == {"FROZEN"}
    assert freezer.state(cg) == FreezerState.THAWED


def test_v1_freeze_retries_a_freeze_that_stopped_short(v1_tree, kernel_v1):
    """FREEZING for good until FROZEN is written again (a task was busy
    forking when asked): the freeze retries until it is all frozen."""
    freezer, cg = v1_tree
    kernel_v1.short = 3
    freezer.freeze(cg, timeout=5)
    assert freezer.state(cg) == FreezerState.FROZEN
    assert kernel_v1.writes.count("FROZEN") >= 4


def test_v1_kill_all_kills_listed_processes_and_thaws(v1_tree, kernel_v1):
    freezer, cg = v1_tree
    children = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        _write(cg / "cgroup.procs", "".join(f"{c.pid}\n" for c in children))
        freezer.kill_all(cg)
        codes = [c.wait(timeout=5) for c in children]
    finally:
        for c in children:
            c.kill()
            c.wait()
    assert codes == [-9, -9]
    # Frozen first (no forks while walking the list), thawed after: frozen v1
    # tasks act on SIGKILL only once thawed.
    assert kernel_v1.writes[-1] == "THAWED" and set(kernel_v1.writes[:-1]) == {"FROZEN"}
    _write(cg / "cgroup.procs", "")
    freezer.wait_empty(cg, timeout=1)


def test_v1_kill_all_skips_a_pid_no_longer_listed(v1_tree, monkeypatch):
    freezer, cg = v1_tree
    child = subprocess.Popen(["sleep", "60"])
    try:
        listings = iter([[child.pid], [child.pid], []])   # gone from the cgroup meanwhile
        monkeypatch.setattr(freezer, "procs", lambda path: next(listings))
        monkeypatch.setattr(freezer, "freeze", lambda path, timeout: None)
        freezer.kill_all(cg)
        assert child.poll() is None      # not ours any more: not killed
    finally:
        child.kill()
        child.wait()


def test_v1_wait_empty_times_out(v1_tree):
    freezer, cg = v1_tree
    with pytest.raises(TimeoutError):
        freezer.wait_empty(cg, timeout=0.05)


# --- parsing and the factory ---------------------------------------------------

def test_parse_keyed():
    assert cgroupfs.parse_keyed("populated 1\nfrozen 0\n") == {"populated": 1, "frozen": 0}
    assert cgroupfs.parse_keyed("") == {}


def test_open_freezer_picks_v2_when_it_can_freeze(tmp_path):
    v2 = tmp_path / "unified"
    (v2 / "ckptd").mkdir(parents=True)
    _write(v2 / "cgroup.controllers", "")
    _write(v2 / "ckptd" / "cgroup.freeze", "0\n")   # as the kernel would create it
    freezer = open_freezer("auto", "ckptd", tmp_path / "freezer", v2)
    assert freezer.name == "cgroup2" and freezer.mount == v2


def test_open_freezer_without_freeze_support_removes_its_probe(tmp_path):
    v2 = tmp_path / "unified"
    v2.mkdir()
    _write(v2 / "cgroup.controllers", "")
    # Our fake kernel creates no cgroup.freeze in new cgroups (like Linux < 5.2),
    # and the fake v1 dir is no freezer mount: nothing is usable.
    with pytest.raises(OSError) as info:
        open_freezer("auto", "ckptd", tmp_path / "freezer", v2)
    assert info.value.errno == errno.ENOTSUP
    assert not (v2 / "ckptd").exists()
    with pytest.raises(OSError) as info:
        open_freezer("cgroup2", "ckptd", tmp_path / "freezer", v2)
    assert info.value.errno == errno.ENOTSUP


def test_open_freezer_rejects_unknown_kinds(tmp_path):
    with pytest.raises(OSError) as info:
        open_freezer("cgroup3", "ckptd", tmp_path, tmp_path)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        make_freezer("cgroup3", tmp_path, tmp_path)
    assert make_freezer("cgroup1", tmp_path / "a", tmp_path / "b").mount == tmp_path / "a"
