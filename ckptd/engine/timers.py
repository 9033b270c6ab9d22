"""Interval timers (setitimer) and POSIX timers with their original ids."""

from __future__ import annotations

import struct
from collections.abc import Callable

from ckptd.engine.probe import OUT
from ckptd.errors import UnsupportedError
from ckptd.kernel import proctask, sysnr
from ckptd.v1 import image_pb2

SIGEV = {"signal": 0, "none": 1, "thread": 4}   # SIGEV_SIGNAL, _NONE, _THREAD_ID
ITIMER_REAL = 0
# CPU-time itimers (VIRTUAL, PROF) are armed against a precise runtime sample
# but later read against tick-accounted time that lags it by up to one tick
# (4 ms at CONFIG_HZ=250): arming a fresh task with the dumped value then reads
# back up to a tick more than was dumped, even above the interval. Arming one
# tick short keeps the observed value within what the dumped task would show.
CPU_TICK_US = 4000


def dump_itimers(probe) -> Callable[[], list[image_pb2.ITimer]]:
    """Asks ``probe``; call the result once it has run."""
    asked = [(which, probe.ask(sysnr.GETITIMER, which, OUT, out=32, what=f"getitimer({which})"))
             for which in range(3)]
    # Kept if the interval alone is set: an ITIMER_REAL that fired while its
    # SIGALRM is still pending reads 0 left (the kernel rearms it when the
    # signal is taken), yet it is armed.
    return lambda: [image_pb2.ITimer(which=which, value=a.data) for which, a in asked
                    if any(a.data)]


def dump_posix_timers(probe, pid: int) -> Callable[[], list[image_pb2.PosixTimer]]:
    """Timers from /proc now, their time left from ``probe`` once it has run."""
    asked = []
    for t in proctask.read_timers(pid):
        if t.notify not in SIGEV:
            raise UnsupportedError(f"pid {pid} has POSIX timer {t.id} with notify "
                                   f"{t.notify!r}", pid=pid, kind="posix timer")
        asked.append((t, probe.ask(sysnr.TIMER_GETTIME, t.id, OUT, out=32,
                                   what=f"timer_gettime({t.id})")))
    return lambda: [image_pb2.PosixTimer(id=t.id, clock_id=t.clock_id, signo=t.signo,
                                         notify=SIGEV[t.notify], notify_tid=t.notify_pid,
                                         sigval=t.sigval, spec=a.data) for t, a in asked]


def restore_itimers(batch, task: image_pb2.Task) -> None:
    for t in task.itimers:
        if len(t.value) != 32 or t.which >= 3:
            continue
        i_sec, i_usec, v_sec, v_usec = struct.unpack("<qqqq", t.value)
        if not (v_sec or v_usec):
            # Fired, its signal pending (restored as such): setitimer with 0
            # would disarm it; arm the next period, as taking the signal would.
            v_sec, v_usec = i_sec, i_usec
        if t.which != ITIMER_REAL:
            us = max(1, v_sec * 1_000_000 + v_usec - CPU_TICK_US)
            v_sec, v_usec = divmod(us, 1_000_000)
        value = struct.pack("<qqqq", i_sec, i_usec, v_sec, v_usec)
        batch.call(sysnr.SETITIMER, t.which, batch.put(value), 0, what="setitimer")


def restore_posix_timers(batch, task: image_pb2.Task, tid: int) -> None:
    if not task.posix_timers:
        return
    batch.call(sysnr.PRCTL, sysnr.PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0,
               what="PR_TIMER_CREATE_RESTORE_IDS on")
    others = {th.tid for th in task.threads[1:]}
    for t in sorted(task.posix_timers, key=lambda t: t.id):
        # SIGEV_THREAD_ID: at the thread it named (threads exist by now), or
        # the leader, which ``tid`` names in the task's own namespace.
        notify_tid = (t.notify_tid if t.notify_tid in others else tid) if t.notify == 4 else 0
        sev = batch.put(struct.pack("<Qiii", t.sigval, t.signo, t.notify, notify_tid)
                        + b"\0" * 44)
        idp = batch.put(struct.pack("<i", t.id))
        batch.call(sysnr.TIMER_CREATE, t.clock_id, sev, idp, what=f"timer_create id {t.id}")
        if any(t.spec[16:32]):
            batch.call(sysnr.TIMER_SETTIME, t.id, 0, batch.put(t.spec), 0,
                       what=f"timer_settime {t.id}")
    batch.call(sysnr.PRCTL, sysnr.PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0,
               what="PR_TIMER_CREATE_RESTORE_IDS off")
