"""Spares: processes started ahead of need wait under SCHED_IDLE and run
under SCHED_OTHER once taken; close leaves none behind."""

from __future__ import annotations

import os
import subprocess

import pytest

from harness import wait_for
from helpers import require_root

from ckptd.containers.spares import Spares

pytestmark = pytest.mark.root


def _spawn() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)


def _discard(p: subprocess.Popen[bytes]) -> None:
    p.kill()
    p.wait()


def test_spares_wait_idle_and_run_normally_once_taken() -> None:
    require_root()     # leaving SCHED_IDLE needs CAP_SYS_NICE
    made: list[subprocess.Popen[bytes]] = []

    def make() -> subprocess.Popen[bytes]:
        made.append(_spawn())
        return made[-1]

    spares = Spares("test", 2, make, lambda p: p.poll() is None, _discard, pid=lambda p: p.pid)
    try:
        wait_for(lambda: len(spares._ready) == 2, 10, "two spares")
        assert {os.sched_getscheduler(p.pid) for p in spares._ready} == {os.SCHED_IDLE}
        taken = spares.take()
        assert os.sched_getscheduler(taken.pid) == os.SCHED_OTHER
        wait_for(lambda: len(spares._ready) == 2, 10, "the spare topped up")
        assert taken not in spares._ready
        _discard(taken)
    finally:
        spares.close()
    assert all(p.poll() is not None for p in made)
