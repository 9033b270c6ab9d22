"""The threads of a process: what each one owns, and recreating them.

Dump: per thread, from outside (registers, xstate, mask, private pending
signals, rseq, seccomp, affinity) and from inside by injection through the
thread itself (altstack, scheduling, robust list, clear-child-tid, creds).

Restore: the leader (the stub) clones every other thread with ``clone3`` and
``set_tid`` = its original tid, all in one batch; the leader is traced with
PTRACE_O_TRACECLONE, so each new thread is traced from birth and stops before
it runs a single instruction of its own (it would otherwise go on running
the batch runner it was cloned from). Then each thread runs its own batch
(``restore_thread``): what Linux keeps per thread, credentials and seccomp
last. Registers come at the very end, with the leader's.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from ckptd.engine import creds, identity, seccomp, signals
from ckptd.errors import ImageError
from ckptd.kernel import procfs, proctask, ptrace, sysnr
from ckptd.v1 import image_pb2

PID_MAX = 1 << 22             # PID_MAX_LIMIT on 64-bit
# More threads than the batch runner's record area can clone in one go is
# surely not an image we wrote (each clone takes one record).
MAX_THREADS = 16384
_CLONE_ARGS = struct.Struct("<11Q")   # struct clone_args, up to and including cgroup
CLONE_PARENT = 0x8000


def dump_thread(tid: int, probe, regs: ptrace.Regs,
                status: dict[str, str] | None = None) -> Callable[[], image_pb2.Thread]:
    """One thread, seized and stopped: what shows from outside now, what only
    it can tell asked of ``probe`` (its own); call the result once that has run."""
    status = status or procfs.read_status(tid)
    filters, filter_flags = seccomp.dump_seccomp(tid)
    th = image_pb2.Thread(tid=int(status.get("NSpid", str(tid)).split()[-1]),
                          regs=regs.pack(), xstate=ptrace.get_xstate(tid),
                          sigmask=ptrace.get_sigmask(tid),
                          pending=signals.dump_pending(tid, shared=False),
                          seccomp_filters=filters, seccomp_flags=filter_flags,
                          cpu_affinity=sum(1 << c for c in os.sched_getaffinity(tid) if c < 64))
    altstack = signals.dump_altstack(probe)
    cred = creds.dump_creds(tid, probe, status)
    attrs = identity.dump_thread_attrs(tid, probe, th, status)

    def answer() -> image_pb2.Thread:
        th.sigaltstack = altstack.data
        th.creds.CopyFrom(cred())
        attrs()
        return th
    return answer


def check_threads(task: image_pb2.Task) -> None:
    if not 1 <= len(task.threads) <= MAX_THREADS:
        raise ImageError(f"task {task.pid} with {len(task.threads)} threads", record="TASK")
    if task.threads[0].tid != task.pid:
        raise ImageError(f"the first thread {task.threads[0].tid} is not the leader "
                         f"{task.pid}", record="TASK")
    tids = [th.tid for th in task.threads]
    if len(set(tids)) != len(tids) or not all(1 <= t < PID_MAX for t in tids):
        raise ImageError(f"bad or repeated thread ids {tids}", record="TASK")
    for th in task.threads:
        if len(th.regs) != ptrace.REGS_SIZE or not 576 <= len(th.xstate) <= ptrace.XSTATE_BUFFER:
            raise ImageError(f"register sets of the wrong size in thread {th.tid}",
                             record="TASK")
        seccomp.check_seccomp(th.seccomp_filters)


def clone_threads(batch, task: image_pb2.Task, stack: int, stack_size: int) -> None:
    """Add a clone3 of every thread but the leader to the leader's ``batch``.
    The stack is never used (each thread stops at birth and gets its own
    registers) but must be valid memory for clone3."""
    for th in task.threads[1:]:
        set_tid = batch.put(struct.pack("<i", th.tid), 8)
        args = batch.put(_CLONE_ARGS.pack(sysnr.CLONE_THREAD_FLAGS, 0, 0, 0, 0, stack,
                                          stack_size, 0, set_tid, 1, 0), 8)
        batch.call(sysnr.CLONE3, args, _CLONE_ARGS.size, what=f"clone3 of thread {th.tid}")


def clone_children(batch, children: list[image_pb2.Task],
                   flags: dict[int, int] | None = None) -> None:
    """Add a clone3 of each child process with its pid and exit signal to
    its parent's ``batch``: a copy of the cloning stub, sharing what
    ``flags`` (pid -> CLONE_* bits, sharing_tables.plan) says. With
    CLONE_PARENT the kernel gives it the cloner's exit signal (clone3 wants 0)."""
    for child in children:
        how = (flags or {}).get(child.pid, 0)
        exit_signal = 0 if how & CLONE_PARENT else child.exit_signal
        set_tid = batch.put(struct.pack("<i", child.pid), 8)
        args = batch.put(_CLONE_ARGS.pack(how, 0, 0, 0, exit_signal, 0, 0, 0, set_tid,
                                          1, 0), 8)
        batch.call(sysnr.CLONE3, args, _CLONE_ARGS.size, what=f"clone3 of child {child.pid}")


def restore_thread(batch, task: image_pb2.Task, th: image_pb2.Thread, pid: int, tid: int,
                   current_bnd: int) -> None:
    """What each thread sets for itself, in its own batch (the leader's is part
    of the leader's batch). ``pid`` and ``tid`` name the process and this
    thread in their PID namespace."""
    signals.restore_altstack(batch, th.sigaltstack)
    identity.restore_thread_attrs(batch, th)
    signals.restore_thread_pending(batch, th, pid, tid)
    creds.restore_creds(batch, th.creds, current_bnd)
    identity.restore_late_attrs(batch, task, th)
    seccomp.restore_seccomp(batch, th.seccomp_filters, th.seccomp_flags)


def host_tids(pid: int) -> dict[int, int]:
    """Thread id in the process's PID namespace -> host tid, for every thread."""
    out = {}
    for tid in proctask.list_threads(pid):
        out[int(procfs.read_status(tid).get("NSpid", str(tid)).split()[-1])] = tid
    return out


def wait_born(tid: int) -> None:
    """Wait for a thread cloned under PTRACE_O_TRACECLONE to report its first
    stop (a PTRACE_EVENT_STOP, taken before it runs anything)."""
    stop = ptrace.wait_stop(tid)
    if stop.exited or stop.event != ptrace.PTRACE_EVENT_STOP:
        raise OSError(3, f"new thread {tid} {stop.describe()} instead of stopping at birth",
                      tid)
