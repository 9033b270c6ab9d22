"""ptrace(2) for x86_64: seize, interrupt, wait, registers, xstate, signals.

The raw binding goes through ``syscall(SYS_ptrace, ...)`` rather than glibc's
variadic ``ptrace()`` wrapper, whose PEEK* requests mangle the return value.
Every failure is ``OSError(errno, message, pid)``. Only the thread that
attached may use these on a tracee: callers keep one engine thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from dataclasses import dataclass, fields, replace

from ckptd.kernel.syscalls import Iovec, libc

SYS_PTRACE = 101

PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_SINGLESTEP = 9
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_SECCOMP_GET_METADATA = 0x420D
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F

PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_STOP = 128
PTRACE_PEEKSIGINFO_SHARED = 1

NT_PRSTATUS = 1
NT_X86_XSTATE = 0x202

# The kernel refuses shorter xstate buffers with EFAULT; this machine's is
# 11,008 bytes (AMX-sized). 16 KiB is room for any x86 xstate layout so far;
# the kernel tells the real size in the iovec it returns.
XSTATE_BUFFER = 16 << 10
SIGINFO_SIZE = 128
# PEEKSIGINFO is asked for this many entries per call.
SIGINFO_BATCH = 64

__WALL = 0x40000000
# How often wait_exits looks again while no tracee has changed state.
EXIT_POLL = 0.0005




def _ptrace(request: int, pid: int, addr: object = 0, data: object = 0) -> int:
    ret = libc().syscall(ctypes.c_long(SYS_PTRACE), ctypes.c_long(request),
                          ctypes.c_long(pid), _arg(addr), _arg(data))
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request:#x}) failed: {os.strerror(err)}", pid)
    return ret


def _arg(value: object) -> object:
    if isinstance(value, int):
        return ctypes.c_ulong(value & 0xFFFF_FFFF_FFFF_FFFF)
    return value


@dataclass(frozen=True)
class Regs:
    """``struct user_regs_struct`` (NT_PRSTATUS), field order as the kernel's."""

    r15: int; r14: int; r13: int; r12: int; rbp: int; rbx: int; r11: int  # noqa: E702
    r10: int; r9: int; r8: int; rax: int; rcx: int; rdx: int; rsi: int  # noqa: E702
    rdi: int; orig_rax: int; rip: int; cs: int; eflags: int; rsp: int  # noqa: E702
    ss: int; fs_base: int; gs_base: int; ds: int; es: int; fs: int; gs: int  # noqa: E702

    def pack(self) -> bytes:
        return _REGS.pack(*(getattr(self, f.name) & 0xFFFF_FFFF_FFFF_FFFF
                            for f in fields(self)))

    @classmethod
    def unpack(cls, raw: bytes) -> Regs:
        return cls(*_REGS.unpack(raw[:_REGS.size]))

    def with_(self, **changes: int) -> Regs:
        """A copy with some registers changed; values kept as unsigned 64-bit."""
        return replace(self, **{k: v & 0xFFFF_FFFF_FFFF_FFFF for k, v in changes.items()})

    @property
    def syscall_result(self) -> int:
        """rax as the signed value a syscall returns."""
        return _signed(self.rax)

    @property
    def orig_syscall(self) -> int:
        return _signed(self.orig_rax)


_REGS = struct.Struct("<27Q")
REGS_SIZE = _REGS.size


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def seize(pid: int, options: int = 0) -> None:
    _ptrace(PTRACE_SEIZE, pid, 0, options)


def interrupt(pid: int) -> None:
    _ptrace(PTRACE_INTERRUPT, pid)


def cont(pid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_CONT, pid, 0, sig)


def singlestep(pid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_SINGLESTEP, pid, 0, sig)


def syscall(pid: int, sig: int = 0) -> None:
    """Resume until the next syscall entry or exit."""
    _ptrace(PTRACE_SYSCALL, pid, 0, sig)


def detach(pid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_DETACH, pid, 0, sig)


def set_options(pid: int, options: int) -> None:
    _ptrace(PTRACE_SETOPTIONS, pid, 0, options)


def get_event_msg(pid: int) -> int:
    """The message of the last ptrace event (the new tid after a clone event)."""
    value = ctypes.c_ulong()
    _ptrace(PTRACE_GETEVENTMSG, pid, 0, ctypes.byref(value))
    return value.value


@dataclass(frozen=True)
class Stop:
    """What ``wait_stop`` saw: a stop (sig, event) or an exit."""

    pid: int
    status: int

    @property
    def exited(self) -> bool:
        return os.WIFEXITED(self.status) or os.WIFSIGNALED(self.status)

    @property
    def stopped(self) -> bool:
        return os.WIFSTOPPED(self.status)

    @property
    def sig(self) -> int:
        return os.WSTOPSIG(self.status) if self.stopped else 0

    @property
    def event(self) -> int:
        return (self.status >> 16) & 0xFF

    def describe(self) -> str:
        if os.WIFEXITED(self.status):
            return f"exited with status {os.WEXITSTATUS(self.status)}"
        if os.WIFSIGNALED(self.status):
            return f"killed by signal {os.WTERMSIG(self.status)}"
        return f"stopped by signal {self.sig} (event {self.event})"


def wait_stop(pid: int) -> Stop:
    """The next state change of a tracee (waitpid with __WALL, retried on EINTR)."""
    _, status = os.waitpid(pid, __WALL)
    return Stop(pid, status)


def wait_exits(tids: list[int], timeout: float) -> list[int]:
    """Collect the exits of killed tracees, in whatever order they come: the
    last thread of a PID namespace's init waits in exit for the namespace's
    other tasks to be released, which for traced threads means reaped by us.
    A stop still reported is resumed (the pending SIGKILL ends it). Returns
    the tids not collected by ``timeout`` seconds."""
    pending = set(tids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        progressed = False
        for tid in sorted(pending):
            try:
                got, status = os.waitpid(tid, __WALL | os.WNOHANG)
            except ChildProcessError:
                pending.discard(tid)   # not ours (never seized) or already reaped
                continue
            if got == 0:
                continue
            progressed = True
            stop = Stop(tid, status)
            if stop.exited:
                pending.discard(tid)
            else:
                try:
                    cont(tid, 0)
                except ProcessLookupError:
                    pass   # dying: its exit comes next
        if not progressed:
            time.sleep(EXIT_POLL)
    return sorted(pending)


def get_regs(pid: int) -> Regs:
    buf = ctypes.create_string_buffer(REGS_SIZE)
    iov = Iovec(ctypes.cast(buf, ctypes.c_void_p), REGS_SIZE)
    _ptrace(PTRACE_GETREGSET, pid, NT_PRSTATUS, ctypes.byref(iov))
    return Regs.unpack(buf.raw)


def set_regs(pid: int, regs: Regs) -> None:
    raw = regs.pack()
    buf = ctypes.create_string_buffer(raw, len(raw))
    iov = Iovec(ctypes.cast(buf, ctypes.c_void_p), len(raw))
    _ptrace(PTRACE_SETREGSET, pid, NT_PRSTATUS, ctypes.byref(iov))


def get_xstate(pid: int) -> bytes:
    buf = ctypes.create_string_buffer(XSTATE_BUFFER)
    iov = Iovec(ctypes.cast(buf, ctypes.c_void_p), XSTATE_BUFFER)
    _ptrace(PTRACE_GETREGSET, pid, NT_X86_XSTATE, ctypes.byref(iov))
    return buf.raw[:iov.len]


def set_xstate(pid: int, raw: bytes) -> None:
    buf = ctypes.create_string_buffer(raw, len(raw))
    iov = Iovec(ctypes.cast(buf, ctypes.c_void_p), len(raw))
    _ptrace(PTRACE_SETREGSET, pid, NT_X86_XSTATE, ctypes.byref(iov))


def get_sigmask(pid: int) -> int:
    mask = ctypes.c_uint64()
    _ptrace(PTRACE_GETSIGMASK, pid, 8, ctypes.byref(mask))
    return mask.value


def set_sigmask(pid: int, mask: int) -> None:
    value = ctypes.c_uint64(mask)
    _ptrace(PTRACE_SETSIGMASK, pid, 8, ctypes.byref(value))


def get_siginfo(pid: int) -> bytes:
    buf = ctypes.create_string_buffer(SIGINFO_SIZE)
    _ptrace(PTRACE_GETSIGINFO, pid, 0, buf)
    return buf.raw


class _PeekArgs(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


def peek_siginfo(pid: int, shared: bool) -> list[bytes]:
    """Every queued siginfo (128 bytes each) of the thread or, if ``shared``,
    of the thread group, in queue order."""
    out: list[bytes] = []
    buf = ctypes.create_string_buffer(SIGINFO_SIZE * SIGINFO_BATCH)
    while True:
        args = _PeekArgs(len(out), PTRACE_PEEKSIGINFO_SHARED if shared else 0, SIGINFO_BATCH)
        n = _ptrace(PTRACE_PEEKSIGINFO, pid, ctypes.byref(args), buf)
        raw = buf.raw
        out.extend(raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE] for i in range(n))
        if n < SIGINFO_BATCH:
            return out


@dataclass(frozen=True)
class RseqConfig:
    ptr: int
    size: int
    sig: int
    flags: int


def get_rseq(pid: int) -> RseqConfig:
    buf = ctypes.create_string_buffer(32)
    _ptrace(PTRACE_GET_RSEQ_CONFIGURATION, pid, 32, buf)
    # struct ptrace_rseq_configuration: u64 pointer, u32 size, u32 signature, u32 flags
    ptr, size, sig, flags = struct.unpack_from("<QIII", buf.raw)
    return RseqConfig(ptr, size, sig, flags)


def seccomp_filters(pid: int) -> list[bytes]:
    """The task's seccomp BPF programs, innermost (most recent) first, each as
    raw ``struct sock_filter`` instructions (8 bytes each)."""
    out: list[bytes] = []
    for index in range(1 << 16):
        try:
            n = _ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index, 0)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return out
            if e.errno == errno.EINVAL and index == 0:
                return out   # not in filter mode: no filters
            raise
        buf = ctypes.create_string_buffer(n * 8)
        _ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index, buf)
        out.append(buf.raw)
    return out


def seccomp_filter_flags(pid: int, index: int) -> int:
    """The SECCOMP_FILTER_FLAG_* a filter was installed with (LOG, SPEC_ALLOW)."""
    buf = ctypes.create_string_buffer(struct.pack("<QQ", index, 0), 16)
    _ptrace(PTRACE_SECCOMP_GET_METADATA, pid, 16, buf)
    return struct.unpack_from("<QQ", buf.raw)[1]
