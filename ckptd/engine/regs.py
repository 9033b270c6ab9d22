"""Registers and extended FPU state of a thread, and the fixups that make a
task stopped inside an interrupted syscall restart it in its new life."""

from __future__ import annotations

from ckptd.kernel import ptrace

ERESTARTSYS = -512
ERESTARTNOINTR = -513
ERESTARTNOHAND = -514
ERESTART_RESTARTBLOCK = -516
SYSCALL_INSN = 2               # bytes of "syscall": rip moves back this far to re-run it
NR_NANOSLEEP = 35
NR_CLOCK_NANOSLEEP = 230
TIMER_ABSTIME = 1
# xsave header: xstate_bv at byte 512, xcomp_bv at 520. The kernel refuses
# PKRU (bit 9) and AMX tile data (bit 18) set through ptrace, and any xcomp_bv.
XSTATE_BV = 512
XCOMP_BV = 520
REFUSED_FEATURES = (1 << 9) | (1 << 18)


def restart_fixup(regs: ptrace.Regs) -> ptrace.Regs:
    """Registers to resume with: a syscall interrupted by the checkpoint is
    re-issued (a new task has no restart block, so -516 re-issues the call
    with the remaining time the kernel already wrote to ``rem``)."""
    ret = regs.syscall_result
    if regs.orig_syscall < 0:
        return regs.with_(orig_rax=-1)
    if ret in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
        return regs.with_(rax=regs.orig_rax, rip=regs.rip - SYSCALL_INSN, orig_rax=-1)
    if ret == ERESTART_RESTARTBLOCK:
        fixed = regs.with_(rax=regs.orig_rax, rip=regs.rip - SYSCALL_INSN, orig_rax=-1)
        if regs.orig_rax == NR_NANOSLEEP and regs.rsi:
            fixed = fixed.with_(rdi=regs.rsi)
        elif (regs.orig_rax == NR_CLOCK_NANOSLEEP and not regs.rsi & TIMER_ABSTIME
              and regs.r10):
            fixed = fixed.with_(rdx=regs.r10)
        return fixed
    return regs.with_(orig_rax=-1)


def settable_xstate(raw: bytes) -> bytes:
    if len(raw) < XCOMP_BV + 8:
        return raw
    buf = bytearray(raw)
    bv = int.from_bytes(buf[XSTATE_BV:XSTATE_BV + 8], "little") & ~REFUSED_FEATURES
    buf[XSTATE_BV:XSTATE_BV + 8] = bv.to_bytes(8, "little")
    buf[XCOMP_BV:XCOMP_BV + 8] = bytes(8)
    return bytes(buf)
