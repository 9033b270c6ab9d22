"""Signal state: handlers (all 64), the altstack, the mask, pending signals.

Handlers and the altstack are only known to the task itself (injected
rt_sigaction/sigaltstack); the mask and pending queues come from ptrace.
Restore blocks everything while it works, queues the pending signals from
inside (sending to oneself allows any si_code), and sets the real mask last.
"""

from __future__ import annotations

import signal
import struct
from collections.abc import Callable

from ckptd.engine.probe import OUT, Answer
from ckptd.errors import ImageError
from ckptd.kernel import ptrace, sysnr
from ckptd.v1 import image_pb2

_SIGACTION = struct.Struct("<QQQQ")     # handler, flags, restorer, mask
NSIG = 64
UNCATCHABLE = (9, 19)
SS_DISABLE = 2
SS_AUTODISARM = 1 << 31


def dump_sigactions(probe) -> Callable[[], list[image_pb2.SigAction]]:
    """Asks ``probe`` for every handler (all 64: flags and masks of default
    and ignored ones count too); call the result once the probe has run."""
    asked = [(sig, probe.ask(sysnr.RT_SIGACTION, sig, 0, OUT, 8, out=_SIGACTION.size,
                             what=f"rt_sigaction({sig})"))
             for sig in range(1, NSIG + 1) if sig not in UNCATCHABLE]

    def answer() -> list[image_pb2.SigAction]:
        out = []
        for sig, a in asked:
            h, fl, rest, mask = _SIGACTION.unpack(a.data)
            out.append(image_pb2.SigAction(sig=sig, handler=h, flags=fl, restorer=rest,
                                           mask=mask))
        return out
    return answer


def dump_altstack(probe) -> Answer:
    """The raw stack_t, in the answer's data once the probe has run."""
    return probe.ask(sysnr.SIGALTSTACK, 0, OUT, out=24, what="sigaltstack")


def dump_pending(pid: int, shared: bool) -> list[image_pb2.PendingSignal]:
    return [image_pb2.PendingSignal(sig=struct.unpack_from("<i", info)[0], siginfo=info)
            for info in ptrace.peek_siginfo(pid, shared)]


def check_signals(task: image_pb2.Task) -> None:
    for a in task.sigactions:
        if not 1 <= a.sig <= NSIG or a.sig in UNCATCHABLE:
            raise ImageError(f"signal action for bad signal {a.sig}", record="TASK")
    for p in list(task.shared_pending) + [p for t in task.threads for p in t.pending]:
        if not 1 <= p.sig <= NSIG or len(p.siginfo) != 128:
            raise ImageError(f"bad pending signal {p.sig}", record="TASK")


def restore_sigactions(batch, task: image_pb2.Task) -> None:
    """Every action but an ignored SIGTRAP: our next trap would reset it
    (sigtrap.py sets it once the traps are over)."""
    for a in task.sigactions:
        if a.sig == signal.SIGTRAP and a.handler == 1:    # SIG_IGN
            continue
        ptr = batch.put(_SIGACTION.pack(a.handler, a.flags, a.restorer, a.mask))
        batch.call(sysnr.RT_SIGACTION, a.sig, ptr, 0, 8, what=f"rt_sigaction({a.sig})")


def restore_altstack(batch, raw: bytes) -> None:
    if len(raw) != 24:
        return
    sp, flags, size = struct.unpack("<QixxxxQ", raw)
    if flags & SS_DISABLE:
        return
    ptr = batch.put(struct.pack("<QixxxxQ", sp, flags & SS_AUTODISARM, size))
    batch.call(sysnr.SIGALTSTACK, ptr, 0, what="sigaltstack")


def restore_shared_pending(batch, task: image_pb2.Task, pid: int) -> None:
    for p in task.shared_pending:
        ptr = batch.put(p.siginfo)
        batch.call(sysnr.RT_SIGQUEUEINFO, pid, p.sig, ptr, what=f"queue signal {p.sig}")


def restore_thread_pending(batch, th: image_pb2.Thread, pid: int, tid: int) -> None:
    """Queued from inside the thread itself: only a thread sending to itself
    may give any si_code (rt_tgsigqueueinfo), and ``tid`` must be its id in
    its own PID namespace."""
    for p in th.pending:
        ptr = batch.put(p.siginfo)
        batch.call(sysnr.RT_TGSIGQUEUEINFO, pid, tid, p.sig, ptr,
                   what=f"queue thread signal {p.sig} to {tid}")
