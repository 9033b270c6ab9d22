"""Running syscalls inside a stopped tracee.

Knows processes and syscalls, never images. Two ways in:

* ``Tracee.syscall``: one syscall, by single-stepping over a ``syscall``
  instruction already in the task (its vdso at checkpoint time, the
  trampoline's first bytes at restore time), ~11 µs when pinned next to it.
* ``Tracee.run_batch``: a ``Batch`` of syscalls run by the native batch
  runner (ckptd/native/stub.c) in the trampoline: one ptrace round trip for
  the whole list; a call may use the result of an earlier one (``Ref``).

A signal that arrives while we drive the task is suppressed and remembered
(``Tracee.held_signals``) so the caller can re-send it after detaching.
"""

from __future__ import annotations

import os
import signal
import struct
from dataclasses import dataclass, field

from ckptd.errors import BugError
from ckptd.kernel import mem, ptrace

RECORD = struct.Struct("<9Q")     # nr, args[6], flags, result
FLAG_MAY_FAIL = 1 << 8

# Trampoline layout (bytes from its start). One page of code; records for
# 29,000 calls (a process with thousands of VMAs needs a few per VMA); ~2 MiB
# of data (paths, structs, seccomp programs, auxv); a 64 KiB stack at the top
# for the runner (it uses none; room for a signal frame we suppress). Pages
# never touched cost nothing, so being generous is free.
TRAMPOLINE_SIZE = 4 << 20
RECORDS_AT = 0x1000
MAX_RECORDS = (0x200000 - RECORDS_AT) // 72
DATA_AT = 0x200000
DATA_END = TRAMPOLINE_SIZE - 0x10000
STACK_TOP = TRAMPOLINE_SIZE - 64


class InjectError(OSError):
    """An injected syscall failed: errno, and which call."""


@dataclass(frozen=True)
class Ref:
    """Stands for the result of call number ``index`` of the same batch."""

    index: int


@dataclass
class Batch:
    """Syscalls to run in one go, plus the data they point to."""

    data_base: int
    calls: list[tuple[int, tuple[int | Ref, ...], int, str]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    # Bytes the data area holds, and records the record area holds (the
    # restore trampoline's by default; the dump side maps a smaller one).
    data_room: int = DATA_END - DATA_AT
    max_records: int = MAX_RECORDS

    def put(self, raw: bytes, align: int = 16) -> int:
        """Place ``raw`` in the trampoline's data area; its address there."""
        pad = -len(self.data) % align
        self.data += b"\0" * pad
        addr = self.data_base + len(self.data)
        self.data += raw
        if len(self.data) > self.data_room:
            raise BugError(f"batch data of {len(self.data)} bytes overflows the trampoline")
        return addr

    def cstr(self, text: str) -> int:
        return self.put(os.fsencode(text) + b"\0", 1)

    def call(self, nr: int, *args: int | Ref, may_fail: bool = False, what: str = "") -> Ref:
        if len(args) > 6:
            raise BugError("a syscall takes at most 6 arguments")
        if len(self.calls) >= self.max_records:
            raise BugError("batch too long")
        flags = FLAG_MAY_FAIL if may_fail else 0
        for i, a in enumerate(args):
            if isinstance(a, Ref):
                if a.index >= len(self.calls):
                    raise BugError("a call can only use results of earlier calls")
                flags |= 1 << i
        self.calls.append((nr, args, flags, what or f"syscall {nr}"))
        return Ref(len(self.calls) - 1)

    def pack(self) -> bytes:
        out = bytearray()
        for nr, args, flags, _ in self.calls:
            vals = [a.index if isinstance(a, Ref) else a & 0xFFFF_FFFF_FFFF_FFFF for a in args]
            vals += [0] * (6 - len(vals))
            out += RECORD.pack(nr, *vals, flags, 0)
        return bytes(out)


class Tracee:
    """A seized task that we drive; all calls from the thread that seized it."""

    def __init__(self, pid: int, *, memfd: int | None = None) -> None:
        self.pid = pid
        self.owns_memfd = memfd is None
        self.memfd = mem.open_mem(pid, write=True) if memfd is None else memfd
        self.held_signals: list[int] = []
        self.tramp = 0          # trampoline address once mapped (restore)
        self.runner = 0         # batch runner address in it
        self.runner_end = 0     # rip after the runner's final int3
        self.records_at = RECORDS_AT   # trampoline layout: where records go,
        self.stack_top = STACK_TOP     # and the runner's stack

    def thread(self, tid: int) -> Tracee:
        """Another seized thread of the same process: same memory, same
        trampoline and the same list of held signals, its own registers."""
        other = Tracee(tid, memfd=self.memfd)
        other.held_signals = self.held_signals
        other.tramp, other.runner, other.runner_end = self.tramp, self.runner, self.runner_end
        other.records_at, other.stack_top = self.records_at, self.stack_top
        return other

    def close(self) -> None:
        if self.memfd >= 0 and self.owns_memfd:
            os.close(self.memfd)
        self.memfd = -1

    # -- memory --
    def read(self, addr: int, size: int) -> bytes:
        return os.pread(self.memfd, size, addr)

    def write(self, addr: int, data: bytes | memoryview) -> None:
        mem.pwrite_exact(self.memfd, data, addr, self.pid)

    # -- running --
    def resume_until_trap(self, regs: ptrace.Regs, *, step: bool, trap_rip: int) -> ptrace.Regs:
        """Set ``regs``, run (single-step or continue) until the task traps
        with rip == trap_rip; return the registers then."""
        ptrace.set_regs(self.pid, regs)
        while True:
            (ptrace.singlestep if step else ptrace.cont)(self.pid)
            stop = ptrace.wait_stop(self.pid)
            if stop.exited:
                raise OSError(3, f"task died while injecting: {stop.describe()}", self.pid)
            if stop.sig == signal.SIGTRAP and stop.event == 0:
                now = ptrace.get_regs(self.pid)
                if now.rip == trap_rip:
                    return now
                if step:
                    continue   # a step that has not reached the syscall yet
                raise OSError(14, f"unexpected trap at {now.rip:#x}", self.pid)
            if stop.event == 0 and stop.sig:
                # A real signal: hold it, re-send after detach.
                self.held_signals.append(stop.sig)
            # Group-stop or interrupt events: just go on from where we are.

    def syscall(self, gadget: int, nr: int, *args: int, base: ptrace.Regs) -> int:
        """One syscall by single-stepping the ``syscall`` instruction at
        ``gadget``; ``base`` gives the other registers. Returns the signed result."""
        regs = _syscall_regs(base, gadget, nr, args)
        after = self.resume_until_trap(regs, step=True, trap_rip=gadget + 2)
        return after.syscall_result

    def run_batch(self, batch: Batch, base: ptrace.Regs) -> list[int]:
        """Run every call of ``batch`` in the trampoline; the results. Raises
        InjectError naming the first call that failed."""
        if not batch.calls:
            return []
        records_addr = self.tramp + self.records_at
        if batch.data:
            self.write(batch.data_base, bytes(batch.data))
        self.write(records_addr, batch.pack())
        regs = base.with_(rip=self.runner, rdi=records_addr, rsi=len(batch.calls),
                          rsp=self.tramp + self.stack_top, orig_rax=-1, rax=0, eflags=0x246)
        after = self.resume_until_trap(regs, step=False, trap_rip=self.runner_end)
        raw = self.read(records_addr, RECORD.size * len(batch.calls))
        results = [_signed(RECORD.unpack_from(raw, i * RECORD.size)[8])
                   for i in range(len(batch.calls))]
        stopped_at = after.r14
        if stopped_at < len(batch.calls):
            what = batch.calls[stopped_at][3]
            err = -results[stopped_at]
            raise InjectError(err, f"{what} failed inside the task: {os.strerror(err)}",
                              self.pid)
        return results

    def install_trampoline(self, addr: int, code: bytes, runner_offset: int) -> None:
        self.write(addr, code)
        self.tramp = addr
        self.runner = addr + runner_offset
        # The runner ends with int3: the trap leaves rip just past it.
        self.runner_end = addr + len(code)


def _syscall_regs(base: ptrace.Regs, rip: int, nr: int, args: tuple[int, ...]) -> ptrace.Regs:
    a = list(args) + [0] * (6 - len(args))
    return base.with_(rip=rip, rax=nr, orig_rax=-1, rdi=a[0], rsi=a[1], rdx=a[2],
                      r10=a[3], r8=a[4], r9=a[5])


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v
