"""The workloads themselves are known good: run without any checkpoint (ready ->
go -> verify) each one passes, its view from outside stays still while it waits
(what before/after comparisons in c/r tests rely on), and each one's checks can
fail (WL_SABOTAGE, or memory corrupted from outside).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import require_root
from workloads.workloads import (WORKLOADS, Workload, WorkloadError, build_all, compare_views,
                                 outside_view)

SMALL_MEM1G = ("64",)    # MiB: the benchmark size (1 GiB) is not needed to prove it works
NEEDS_ROOT = {"limits_creds"}

# What each workload's WL_SABOTAGE breaks, as its FAIL line names it.
SABOTAGE_SAYS = {
    "regs": "r12:",
    "regs_static": "ymm15 changed",
    "memory": "big: content differs",
    "files": "fd 42 offset",
    "signals": "signal 10 (USR1): action",
    "timers": "ITIMER_REAL interval",
    "limits_creds": "nice is 6",
    "seccomp_rseq": "robust list is",
    "socket_holder": "the data queued in the socketpair is gone",
    "mem1g": "differs",
    "counter": "heap digest",
    "threads": "thread 0 (spin): TLS counter",
    "pythreads": "counter 0 stopped at",
    "tree": ": pgid: got",
    "zombie": "exit 7 (pid",
    "clone_flags": "not in the shared table",
    "vfork": "is not running sleep",
    "sharing": "child: shared.dat offset after the parent's write",
    "fanout": "lost (now",
}


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    build_all()


def start(name: str, dir: Path, **kw) -> Workload:
    if name in NEEDS_ROOT:
        require_root()
    args = SMALL_MEM1G if name == "mem1g" else ()
    return Workload.start(name, dir, args=args, **kw)


def test_every_workload_has_a_sabotage_expectation() -> None:
    assert set(SABOTAGE_SAYS) == set(WORKLOADS)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_passes_without_checkpoint(name: str, tmp_path: Path) -> None:
    with start(name, tmp_path / name) as w:
        info = w.wait_ready()
        assert int(info["pid"]) == w.pid
        before = outside_view(w.pid)
        time.sleep(0.1)
        assert compare_views(before, outside_view(w.pid)) == [], "the view moved while waiting"
        w.go()
        verdict = w.result()
        assert verdict == "PASS", f"{name}:\n{verdict}\noutput:\n{w.output()}"
        assert w.proc.wait(10) == 0
        assert w.output().splitlines() == ["READY", "PASS"]


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_sabotaged_workload_fails(name: str, tmp_path: Path) -> None:
    with start(name, tmp_path / name, env={"WL_SABOTAGE": "1"}) as w:
        w.wait_ready()
        w.go()
        verdict = w.result()
        assert verdict.startswith("FAIL: "), verdict
        assert SABOTAGE_SAYS[name] in verdict, verdict
        assert w.proc.wait(10) == 1


def test_memory_corrupted_from_outside_fails(tmp_path: Path) -> None:
    # What a restore that put one wrong byte in a page would look like.
    with start("memory", tmp_path) as w:
        info = w.wait_ready()
        address = int(info["big"], 16) + 5 * 4096 + 17
        with open(f"/proc/{w.pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(address)
            byte = mem.read(1)
            mem.seek(address)
            mem.write(bytes([byte[0] ^ 0x80]))
        w.go()
        assert w.result().startswith("FAIL: big: content differs at offset 0x5010")  # the word


def test_a_sparse_hole_filled_from_outside_fails(tmp_path: Path) -> None:
    # A restore that wrote garbage into never-touched pages.
    with start("memory", tmp_path) as w:
        info = w.wait_ready()
        with open(f"/proc/{w.pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(int(info["sparse"], 16) + 4096 + 8)
            mem.write(b"\x01")
        w.go()
        assert "sparse hole: byte at offset 0x8 is 0x1, want 0" in w.result()


def test_counter_counts_while_waiting(tmp_path: Path) -> None:
    with start("counter", tmp_path) as w:
        info = w.wait_ready()
        first = w.count()
        assert first >= int(info["count"])
        time.sleep(0.1)
        assert w.count() > first
        w.go()
        assert w.result() == "PASS"


def test_limits_creds_works_in_a_private_directory(tmp_path: Path) -> None:
    # uid 1000 cannot reach a 0700 directory by its path; the workload holds a dirfd.
    require_root()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with start("limits_creds", private / "dir") as w:
        info = w.wait_ready()
        assert info["uid"] == "1000,1001,1002"
        w.go()
        assert w.result() == "PASS"


def test_setup_failure_is_reported_before_ready(tmp_path: Path) -> None:
    (tmp_path / "subdir").mkdir()        # files.c wants to create it
    w = start("files", tmp_path)
    with w, pytest.raises(WorkloadError, match="failed before ready: FAIL: setup: mkdir"):
        w.wait_ready(timeout=10)


def test_kill_is_idempotent_and_result_notices_a_dead_workload(tmp_path: Path) -> None:
    w = start("regs", tmp_path)
    w.wait_ready()
    w.kill()
    w.kill()
    assert w.proc.returncode == -9
    with pytest.raises(WorkloadError, match="gone without a result"):
        w.result(timeout=5)

