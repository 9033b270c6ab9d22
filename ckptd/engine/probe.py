"""Questions only a task can answer, asked from inside it while it is dumped.

What the kernel tells nobody but the task itself (signal handlers, itimers,
the altstack, securebits, the clear-child-tid address ...) takes injected
syscalls. A ``Probe`` gathers them for one thread (``ask``: a syscall and the
size of what it writes back, at the argument ``OUT``), then ``run``s them all
at once; the dump functions read the ``Answer``s afterwards.

Two ways to run them:

* through a ``Parasite``: a small trampoline mapped into the process for the
  time of its collection (one injected ``mmap``, one ``munmap``) carrying the
  native batch runner (ckptd/native/stub.c), so that each thread's questions
  cost one ptrace round trip instead of one per syscall (~73 per process);
* one by one, single-stepping the ``syscall`` in the vdso with scratch memory
  below the red zone, where no parasite can be placed: a task under seccomp
  filters (the filter would judge our mmap, and could kill the task for it),
  or one whose kernel or policy refuses an executable anonymous mapping.

Either way the task resumes untouched: registers and scratch bytes are put
back, the trampoline is unmapped at an address that touched no mapping of
the task (so nothing merges with it), and every signal but SIGKILL and
SIGTRAP (see BLOCKED_WHILE_PROBING) is blocked while our code runs, so none
is delivered (and lost) meanwhile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import structlog

from ckptd import native
from ckptd.engine.inject import RECORD, Batch, InjectError, Tracee
from ckptd.errors import UnsupportedError
from ckptd.kernel import ptrace, sysnr
from ckptd.kernel.proctask import SmapsVma

log = structlog.get_logger(__name__)

PAGE = 4096
# The parasite's layout: the blob (~200 bytes) at 0, records from RECORDS_AT,
# answers from DATA_AT, the runner's stack (it uses none) at the top. Four
# pages: a process's questions (~75 records, ~2.2 KiB of answers) fit at
# once; more (many POSIX timers) run as several batches. Small, because a
# task's VmPeak may count it (the kernel keeps the high-water mark).
PARASITE_SIZE = 4 * PAGE
RECORDS_AT = 0x400
DATA_AT = 0x2800
DATA_END = PARASITE_SIZE - 0x400
STACK_TOP = PARASITE_SIZE - 64
MAX_RECORDS = (DATA_AT - RECORDS_AT) // RECORD.size
# Where to look for room: above the first 4 GiB (clear of a brk heap and of
# 32-bit-minded mappings), below the top of user space.
SEARCH_FROM = 1 << 32
TASK_SIZE = (1 << 47) - PAGE
# Scratch below the red zone for the one-by-one way: the largest answer is a
# 32-byte sigaction or timer spec; room for alignment.
SCRATCH = 256
RED_ZONE = 128
SIGTRAP = 5
# Blocked while our code runs: all but SIGTRAP. The runner's int3 and a
# single step raise SIGTRAP by force, and a forced signal that is blocked
# gets its action reset to SIG_DFL (the kernel's force_sig_info_to_task).
BLOCKED_WHILE_PROBING = ((1 << 64) - 1) & ~(1 << (SIGTRAP - 1))


class _Out:
    def __repr__(self) -> str:
        return "OUT"


OUT = _Out()   # an argument that stands for the address of the call's answer buffer


@dataclass
class Answer:
    """One asked syscall: what it is, then (after ``run``) its result and
    the bytes it wrote to its buffer."""

    nr: int
    args: tuple
    out: int
    what: str
    result: int = 0
    data: bytes = b""


class Parasite:
    """The trampoline mapped into one process while it is dumped."""

    def __init__(self, tracee: Tracee, regs: ptrace.Regs, vmas: list[SmapsVma],
                 gadget: int) -> None:
        self.tracee = tracee
        self.regs = regs
        self.gadget = gadget
        self.addr = 0
        self.vmas = vmas

    def attach(self) -> bool:
        """Map and fill the trampoline; False if the task refuses it."""
        addr = free_gap(self.vmas, PARASITE_SIZE)
        got = self.tracee.syscall(self.gadget, sysnr.MMAP, addr, PARASITE_SIZE,
                                  sysnr.PROT_READ | sysnr.PROT_WRITE | sysnr.PROT_EXEC,
                                  sysnr.MAP_PRIVATE | sysnr.MAP_ANONYMOUS
                                  | sysnr.MAP_FIXED_NOREPLACE | sysnr.MAP_NORESERVE, -1, 0,
                                  base=self.regs)
        if got != addr:
            if 0 < got < TASK_SIZE:
                self._unmap(got)   # another address (a kernel without NOREPLACE)
            log.info("parasite_refused", pid=self.tracee.pid, result=got)
            return False
        self.addr = addr
        code, runner = native.stub_blob()
        self.tracee.install_trampoline(addr, code, runner)
        self.tracee.records_at, self.tracee.stack_top = RECORDS_AT, STACK_TOP
        return True

    def detach(self) -> None:
        if not self.addr:
            return
        addr, self.addr = self.addr, 0
        self.tracee.tramp = self.tracee.runner = self.tracee.runner_end = 0
        self._unmap(addr)

    def _unmap(self, addr: int) -> None:
        # Through the vdso's syscall, not the trampoline's: the step returns
        # to memory that is still there.
        got = self.tracee.syscall(self.gadget, sysnr.MUNMAP, addr, PARASITE_SIZE,
                                  base=self.regs)
        ptrace.set_regs(self.tracee.pid, self.regs)
        if got != 0:
            raise OSError(-got, f"cannot unmap the dump trampoline at {addr:#x}: "
                          f"{os.strerror(-got)}", self.tracee.pid)


class Probe:
    """The questions for one thread (``tracee``, stopped with ``regs``)."""

    def __init__(self, tracee: Tracee, regs: ptrace.Regs, vmas: list[SmapsVma],
                 gadget: int) -> None:
        self.tracee = tracee
        self.regs = regs
        self.vmas = vmas
        self.gadget = gadget
        self.asked: list[Answer] = []

    def ask(self, nr: int, *args: int | _Out, out: int = 0, what: str = "") -> Answer:
        a = Answer(nr, args, out, what or f"syscall {nr}")
        self.asked.append(a)
        return a

    def run(self) -> None:
        """Run every question; raise OSError naming the first that failed."""
        if not self.asked:
            return
        tid = self.tracee.pid
        mask = ptrace.get_sigmask(tid)
        ptrace.set_sigmask(tid, BLOCKED_WHILE_PROBING)
        try:
            if self.tracee.tramp:
                self._run_batches()
            else:
                self._run_one_by_one()
        finally:
            ptrace.set_regs(tid, self.regs)
            ptrace.set_sigmask(tid, mask)

    def _run_batches(self) -> None:
        t = self.tracee
        data_base = t.tramp + DATA_AT
        todo = list(self.asked)
        while todo:
            b = Batch(data_base, data_room=DATA_END - DATA_AT, max_records=MAX_RECORDS)
            took: list[tuple[Answer, int]] = []
            for a in todo:
                pad = -len(b.data) % 8
                if (len(b.calls) == MAX_RECORDS
                        or len(b.data) + pad + a.out > b.data_room) and took:
                    break
                at = b.put(bytes(a.out), 8) if a.out else 0
                b.call(a.nr, *(at if x is OUT else x for x in a.args), what=a.what)
                took.append((a, at - data_base))
            results = t.run_batch(b, self.regs)
            raw = t.read(data_base, len(b.data)) if b.data else b""
            for (a, off), res in zip(took, results):
                a.result = res
                a.data = raw[off:off + a.out] if a.out else b""
            todo = todo[len(took):]

    def _run_one_by_one(self) -> None:
        t = self.tracee
        scratch = (self.regs.rsp - RED_ZONE - SCRATCH) & ~0xF
        if not any(v.start <= scratch and scratch + SCRATCH <= v.end and v.perms[1] == "w"
                   for v in self.vmas):
            raise UnsupportedError(f"pid {t.pid}: no writable stack below rsp "
                                   f"{self.regs.rsp:#x} to inject through", pid=t.pid,
                                   kind="stack")
        saved = t.read(scratch, SCRATCH)
        try:
            for a in self.asked:
                args = tuple(scratch if x is OUT else x for x in a.args)
                res = t.syscall(self.gadget, a.nr, *args, base=self.regs)  # type: ignore[arg-type]
                if -4096 < res < 0:
                    raise InjectError(-res, f"{a.what} failed inside the task: "
                                      f"{os.strerror(-res)}", t.pid)
                a.result = res
                a.data = t.read(scratch, a.out) if a.out else b""
        finally:
            t.write(scratch, saved)


def free_gap(vmas: list[SmapsVma], size: int) -> int:
    """An address for ``size`` bytes with a free page on either side, so
    that the mapping can neither merge with nor touch one of the task's."""
    addr = SEARCH_FROM
    for v in sorted(vmas, key=lambda v: v.start):
        if v.end + PAGE <= addr:
            continue
        if addr + size + PAGE <= v.start:
            return addr
        addr = max(addr, v.end + PAGE)
    if addr + size <= TASK_SIZE:
        return addr
    raise UnsupportedError("no room in the address space for the dump trampoline",
                           kind="address space")


def find_gadget(tracee: Tracee, vmas: list[SmapsVma]) -> int:
    """A ``syscall`` instruction in the task's vdso to single-step over."""
    for v in vmas:
        if v.path == "[vdso]":
            code = tracee.read(v.start, v.end - v.start)
            at = code.find(b"\x0f\x05")
            if at >= 0:
                return v.start + at
    raise UnsupportedError(f"pid {tracee.pid} has no vdso to inject syscalls through",
                           pid=tracee.pid, kind="no vdso")
