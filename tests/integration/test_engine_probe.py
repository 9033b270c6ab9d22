"""The dump-side parasite and probe (ckptd/engine/probe.py) on real tasks:
questions answered through a trampoline mapped for the while agree with
the same questions asked one by one, and the task keeps no trace of it:
its maps, registers, extended state, signal mask and stack bytes are as
they were, and it goes on to pass its own checks."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest

from helpers import require_root
from workloads.workloads import Workload

from ckptd.engine import probe
from ckptd.engine.dump import DumpSession
from ckptd.kernel import ptrace, proctask, sysnr

pytestmark = pytest.mark.root

ALL_CATCHABLE = [s for s in range(1, 65) if s not in (9, 19)]
STACK_BYTES = 4096   # below rsp: where the one-by-one way puts its scratch


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _state(tid: int) -> tuple:
    regs = ptrace.get_regs(tid)
    return regs, ptrace.get_xstate(tid), ptrace.get_sigmask(tid)


def _sigactions(q: probe.Probe) -> list[probe.Answer]:
    return [q.ask(sysnr.RT_SIGACTION, s, 0, probe.OUT, 8, out=32) for s in ALL_CATCHABLE]


@pytest.fixture
def seized(tmp_path: Path):
    """The signals workload (handlers, altstack, mask set), seized and stopped."""
    require_root()
    with Workload.start("signals", tmp_path / "wl") as w:
        w.wait_ready()
        session = DumpSession(w.pid)
        session.start()
        try:
            yield w, session.procs[0]
        finally:
            session.finish(kill=False)
        w.go()
        assert w.result() == "PASS", w.output()


def test_parasite_answers_and_leaves_no_trace(seized) -> None:
    w, p = seized
    pid = p.pid
    maps, state = _maps(pid), _state(pid)
    regs = state[0]
    stack = p.tracee.read(regs.rsp - STACK_BYTES, STACK_BYTES)
    vmas = proctask.read_smaps(pid)
    gadget = probe.find_gadget(p.tracee, vmas)
    parasite = probe.Parasite(p.tracee, regs, vmas, gadget)
    assert parasite.attach(), "the parasite was refused"
    try:
        shown = _maps(pid)
        assert f"{parasite.addr:x}-{parasite.addr + probe.PARASITE_SIZE:x} rwxp" in shown
        q = probe.Probe(p.tracee, regs, vmas, gadget)
        getpid = q.ask(sysnr.GETPID, what="getpid")
        actions = _sigactions(q)
        q.run()
        assert p.tracee.tramp == parasite.addr
    finally:
        parasite.detach()
    assert getpid.result == pid
    usr1 = struct.unpack("<QQQQ", actions[ALL_CATCHABLE.index(10)].data)
    assert usr1[0] not in (0, 1), "SIGUSR1's handler was not read"
    assert _maps(pid) == maps
    assert _state(pid) == state
    assert p.tracee.read(regs.rsp - STACK_BYTES, STACK_BYTES) == stack


def test_one_by_one_agrees_with_the_parasite(seized) -> None:
    w, p = seized
    pid = p.pid
    maps, state = _maps(pid), _state(pid)
    regs = state[0]
    stack = p.tracee.read(regs.rsp - STACK_BYTES, STACK_BYTES)
    vmas = proctask.read_smaps(pid)
    gadget = probe.find_gadget(p.tracee, vmas)
    alone = probe.Probe(p.tracee, regs, vmas, gadget)
    one_by_one = _sigactions(alone)
    alone.run()
    parasite = probe.Parasite(p.tracee, regs, vmas, gadget)
    assert parasite.attach()
    try:
        q = probe.Probe(p.tracee, regs, vmas, gadget)
        batched = _sigactions(q)
        q.run()
    finally:
        parasite.detach()
    assert [a.data for a in batched] == [a.data for a in one_by_one]
    assert _maps(pid) == maps
    assert _state(pid) == state
    assert p.tracee.read(regs.rsp - STACK_BYTES, STACK_BYTES) == stack


def test_more_questions_than_one_batch_holds(seized) -> None:
    """Beyond the parasite's record and data room, the probe runs several
    batches; every answer lands on its own question."""
    w, p = seized
    pid = p.pid
    regs = ptrace.get_regs(pid)
    vmas = proctask.read_smaps(pid)
    gadget = probe.find_gadget(p.tracee, vmas)
    parasite = probe.Parasite(p.tracee, regs, vmas, gadget)
    assert parasite.attach()
    try:
        q = probe.Probe(p.tracee, regs, vmas, gadget)
        rounds = 5
        asked = [_sigactions(q) for _ in range(rounds)]
        assert len(q.asked) > 2 * probe.MAX_RECORDS
        q.run()
    finally:
        parasite.detach()
    first = [a.data for a in asked[0]]
    assert all(len(d) == 32 for d in first)
    for later in asked[1:]:
        assert [a.data for a in later] == first


def test_a_failed_question_names_itself_and_leaves_no_trace(seized) -> None:
    w, p = seized
    pid = p.pid
    maps, state = _maps(pid), _state(pid)
    regs = state[0]
    vmas = proctask.read_smaps(pid)
    gadget = probe.find_gadget(p.tracee, vmas)
    parasite = probe.Parasite(p.tracee, regs, vmas, gadget)
    assert parasite.attach()
    try:
        q = probe.Probe(p.tracee, regs, vmas, gadget)
        q.ask(sysnr.GETPID)
        q.ask(sysnr.RT_SIGACTION, 9999, 0, probe.OUT, 8, out=32, what="rt_sigaction(9999)")
        with pytest.raises(OSError, match=r"rt_sigaction\(9999\)") as e:
            q.run()
        assert e.value.errno == 22
    finally:
        parasite.detach()
    assert _maps(pid) == maps
    assert _state(pid) == state


def test_free_gap_keeps_a_page_from_every_mapping() -> None:
    vma = proctask.SmapsVma
    fields = {f: "" for f in vma.__dataclass_fields__}   # type: ignore[attr-defined]

    def v(start: int, end: int):
        return vma(**{**fields, "start": start, "end": end, "perms": "rw-p", "offset": 0,
                      "inode": 0, "path": ""})
    low = probe.SEARCH_FROM
    size = probe.PARASITE_SIZE
    assert probe.free_gap([], size) == low
    tight = [v(low, low + 0x1000), v(low + 0x1000 + size + 0x1000, low + 0x100000)]
    # The gap between them is exactly size plus one page: one page short.
    assert probe.free_gap(tight, size) == low + 0x100000 + 0x1000
    roomy = [v(low, low + 0x1000), v(low + 0x1000 + size + 0x2000, low + 0x100000)]
    assert probe.free_gap(roomy, size) == low + 0x2000


def _sig_fields(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("SigCgt", "SigIgn", "SigBlk"):
            out[key] = value.strip()
    return out


def test_a_sigtrap_handler_survives_being_probed(tmp_path: Path) -> None:
    """Our int3 and single steps raise SIGTRAP by force; were SIGTRAP blocked
    meanwhile, the kernel would reset its action to SIG_DFL."""
    require_root()
    import signal
    import subprocess
    import sys
    from ckptd.engine import api
    ready = tmp_path / "ready"
    code = ("import signal, sys, time, pathlib\n"
            "signal.signal(signal.SIGTRAP, lambda *a: None)\n"
            "signal.signal(signal.SIGUSR2, signal.SIG_IGN)\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
            f"pathlib.Path({str(ready)!r}).touch()\n"
            "while True: time.sleep(1)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            if ready.exists():
                break
            time.sleep(0.01)
        before = _sig_fields(proc.pid)
        assert int(before["SigCgt"], 16) >> (signal.SIGTRAP - 1) & 1
        with open(os.devnull, "wb") as sink:
            api.checkpoint(proc.pid, sink, kill=False)
        assert _sig_fields(proc.pid) == before
    finally:
        proc.kill()
        proc.wait()
