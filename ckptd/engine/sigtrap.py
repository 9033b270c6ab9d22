"""Keep a task's own SIGTRAP state through our traps.

Injecting code raises SIGTRAP by force (a single step, the runner's int3).
A forced signal that the task blocks or ignores makes the kernel reset its
action to the default and unblock it in that thread — for good, even though
the tracer swallows the signal. So before the first trap of a checkpoint:

- each thread that blocks SIGTRAP gets it unblocked (PTRACE_SETSIGMASK, no
  trap needed); its dumped mask is the one it had;
- a process that ignores SIGTRAP gets the default action by an
  rt_sigaction run under PTRACE_SYSCALL stops, which are not signals; the
  old action comes back with it and is what the image records.

``restore_all`` puts both back before the tree is resumed (again under
PTRACE_SYSCALL stops: no trap follows it). A restore sets an ignored SIGTRAP
the same way, last (``restore_ignored``).
"""

from __future__ import annotations

import signal

import structlog

from ckptd.engine import probe, signals
from ckptd.engine.inject import Tracee
from ckptd.errors import SystemError_, UnsupportedError
from ckptd.kernel import procfs, proctask, ptrace, sysnr
from ckptd.kernel import task as task_mod
from ckptd.v1 import image_pb2

log = structlog.get_logger(__name__)

BIT = 1 << (signal.SIGTRAP - 1)
RED_ZONE = 128
SCRATCH = 64            # two struct sigaction (32 bytes each)
ALL_BLOCKED = (1 << 64) - 1
SIG_IGN = 1


class TrapGuard:
    """What we changed of the tree's SIGTRAP state, to report and undo."""

    def __init__(self) -> None:
        self.masks: dict[int, int] = {}            # tid -> its mask, SIGTRAP blocked
        self.actions: dict[int, bytes] = {}        # pid -> its ignored SIGTRAP action
        self._shared: dict[int, int] = {}          # pid -> pid whose handlers it shares
        self._tracees: dict[int, Tracee] = {}

    def arm(self, procs: list[tuple[Tracee, list[int]]]) -> None:
        """``procs``: (tracee, tids) of every stopped process, before any trap."""
        self._tracees = {tracee.pid: tracee for tracee, _ in procs}
        for tracee, tids in procs:
            pid = tracee.pid
            for tid in tids:
                mask = ptrace.get_sigmask(tid)
                if mask & BIT:
                    ptrace.set_sigmask(tid, mask & ~BIT)
                    self.masks[tid] = mask
            if not int(procfs.read_status(pid).get("SigIgn", "0"), 16) & BIT:
                continue
            twin = next((p for p in self.actions
                         if task_mod.kcmp(pid, p, task_mod.KCMP_SIGHAND) == 0), None)
            if twin is not None:
                self._shared[pid] = twin        # one table of handlers: done already
                continue
            self.actions[pid] = _sigaction(tracee, bytes(signals._SIGACTION.size))
        if self.masks or self.actions:
            log.debug("sigtrap_guarded", threads=sorted(self.masks), ignored=sorted(self.actions))

    def fix(self, pid: int, task: image_pb2.Task, tids: list[int]) -> None:
        """The image records what the task had, not what we made it."""
        for th, tid in zip(task.threads, tids):
            if tid in self.masks:
                th.sigmask = self.masks[tid]
        old = self.actions.get(self._shared.get(pid, pid))
        if old is None:
            return
        h, fl, rest, mask = signals._SIGACTION.unpack(old)
        for a in task.sigactions:
            if a.sig == signal.SIGTRAP:
                a.handler, a.flags, a.restorer, a.mask = h, fl, rest, mask

    def restore_all(self) -> None:
        """Before the tree is resumed: actions first (that needs the
        threads' masks as we set them), then the masks."""
        for pid, old in self.actions.items():
            try:
                _sigaction(self._tracees[pid], old)
            except (OSError, SystemError_) as e:
                log.warning("sigtrap_not_restored", pid=pid, error=str(e))
        self.actions = {}
        for tid, mask in self.masks.items():
            try:
                ptrace.set_sigmask(tid, mask)
            except ProcessLookupError:
                pass   # gone: nothing to give back
        self.masks = {}


def restore_ignored(tracee: Tracee, task: image_pb2.Task, options: int) -> None:
    """Restore: a SIGTRAP the task ignored is set last, once its registers
    are in place and no trap of ours follows (signals.restore_sigactions
    leaves it out: the next trap would reset it)."""
    for a in task.sigactions:
        if a.sig == signal.SIGTRAP and a.handler == SIG_IGN:
            _sigaction(tracee, signals._SIGACTION.pack(a.handler, a.flags, a.restorer, a.mask),
                       options)


def _sigaction(tracee: Tracee, new: bytes, options: int = 0) -> bytes:
    """rt_sigaction(SIGTRAP, new, old) in the task under PTRACE_SYSCALL stops,
    with every signal blocked meanwhile; returns the old action. The task's
    registers and the stack bytes used are put back."""
    pid = tracee.pid
    regs = ptrace.get_regs(pid)
    vmas = proctask.parse_smaps(proctask.read_maps(pid))
    scratch = (regs.rsp - RED_ZONE - SCRATCH) & ~0xF
    if not any(v.start <= scratch and scratch + SCRATCH <= v.end and v.perms[1] == "w"
               for v in vmas):
        raise UnsupportedError(f"pid {pid} ignores SIGTRAP and has no writable stack to "
                               "keep that through the checkpoint", pid=pid, kind="stack")
    gadget = probe.find_gadget(tracee, vmas)
    saved = tracee.read(scratch, SCRATCH)
    mask = ptrace.get_sigmask(pid)
    ptrace.set_options(pid, ptrace.PTRACE_O_TRACESYSGOOD)
    try:
        ptrace.set_sigmask(pid, ALL_BLOCKED)
        size = signals._SIGACTION.size
        tracee.write(scratch, new)
        ptrace.set_regs(pid, regs.with_(rip=gadget, rax=sysnr.RT_SIGACTION, orig_rax=-1,
                                        rdi=signal.SIGTRAP, rsi=scratch, rdx=scratch + size,
                                        r10=8))
        stops = 0
        while stops < 2:
            ptrace.syscall(pid)
            stop = ptrace.wait_stop(pid)
            if stop.exited:
                raise SystemError_(f"pid {pid} {stop.describe()} while its SIGTRAP action "
                                   "was set", pid=pid)
            if stop.sig == (signal.SIGTRAP | 0x80):
                stops += 1
        result = ptrace.get_regs(pid).syscall_result
        if result != 0:
            raise SystemError_(f"rt_sigaction(SIGTRAP) in pid {pid} failed: {result}", pid=pid)
        return tracee.read(scratch + size, size)
    finally:
        tracee.write(scratch, saved)
        ptrace.set_regs(pid, regs)
        ptrace.set_sigmask(pid, mask)
        ptrace.set_options(pid, options)

