"""Per-task attributes set by prctl and friends: comm, personality, umask,
nice and scheduler, timer slack, dumpable, pdeathsig, child subreaper, no_new_privs,
and per thread rseq, the robust futex list and the clear-child-tid address."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from ckptd.engine.probe import OUT
from ckptd.kernel import procfs, ptrace, sysnr
from ckptd.kernel import task as task_mod
from ckptd.v1 import image_pb2

PRIO_PROCESS = 0


def dump_task_attrs(pid: int, probe, task: image_pb2.Task,
                    status: dict[str, str] | None = None) -> Callable[[], None]:
    """Fills ``task`` from /proc now and from ``probe`` when the result is
    called, once the probe has run."""
    st = status or procfs.read_status(pid)
    ns_pid = st.get("NSpid", str(pid)).split()[-1]
    task.session_leader = st.get("NSsid", "").split()[-1:] == [ns_pid]
    task.group_leader = st.get("NSpgid", "").split()[-1:] == [ns_pid]
    task.umask = int(st.get("Umask", "0022"), 8)
    pers = probe.ask(sysnr.PERSONALITY, 0xFFFFFFFF, what="personality")
    dumpable = probe.ask(sysnr.PRCTL, sysnr.PR_GET_DUMPABLE, 0, 0, 0, 0, what="dumpable")
    deathsig = probe.ask(sysnr.PRCTL, sysnr.PR_GET_PDEATHSIG, OUT, 0, 0, 0, out=4,
                         what="pdeathsig")
    reaper = probe.ask(sysnr.PRCTL, sysnr.PR_GET_CHILD_SUBREAPER, OUT, 0, 0, 0, out=4,
                       what="child subreaper")

    def answer() -> None:
        task.personality = pers.result & 0xFFFFFFFF
        task.dumpable = dumpable.result == 1
        task.pdeathsig = struct.unpack("<i", deathsig.data)[0]
        task.child_subreaper = struct.unpack("<i", reaper.data)[0] != 0
    return answer


def dump_thread_attrs(tid: int, probe, th: image_pb2.Thread,
                      status: dict[str, str] | None = None) -> Callable[[], None]:
    """What the kernel tells about a thread from outside where it can, the
    rest asked of ``probe``: call the result once it has run."""
    st = status or procfs.read_status(tid)    # /proc/TID works for any thread
    th.no_new_privs = st.get("NoNewPrivs", "0") == "1"
    with open(f"/proc/{tid}/comm", encoding="utf-8", errors="replace") as f:
        th.comm = f.read().rstrip("\n")
    th.nice = os.getpriority(os.PRIO_PROCESS, tid)
    th.sched_policy = os.sched_getscheduler(tid)
    th.sched_priority = os.sched_getparam(tid).sched_priority
    slack = None
    try:
        with open(f"/proc/{tid}/timerslack_ns") as f:
            th.timer_slack = int(f.read())
    except (OSError, ValueError):
        slack = probe.ask(sysnr.PRCTL, sysnr.PR_GET_TIMERSLACK, 0, 0, 0, 0, what="timer slack")
    rseq = ptrace.get_rseq(tid)
    th.rseq_ptr, th.rseq_len, th.rseq_sig = rseq.ptr, rseq.size, rseq.sig
    th.robust_list, th.robust_list_len = task_mod.robust_list(tid)
    tid_address = probe.ask(sysnr.PRCTL, sysnr.PR_GET_TID_ADDRESS, OUT, 0, 0, 0, out=8,
                            what="clear-child-tid address")

    def answer() -> None:
        if slack is not None:
            th.timer_slack = slack.result
        th.clear_tid_address = struct.unpack("<Q", tid_address.data)[0]
    return answer


def restore_session(batch, task: image_pb2.Task, pid: int) -> None:
    """Leadership of its own session or process group, which a single task
    can take back; membership of others' groups comes with process trees."""
    stat = procfs.read_stat(pid)
    if task.session_leader and stat.session != pid:
        batch.call(sysnr.SETSID, what="setsid")
    elif task.group_leader and stat.pgrp != pid:
        batch.call(sysnr.SETPGID, 0, 0, what="setpgid")


def restore_task_attrs(batch, task: image_pb2.Task, *, pdeathsig: bool) -> None:
    batch.call(sysnr.UMASK, task.umask & 0o777, what="umask")
    batch.call(sysnr.PERSONALITY, task.personality, what="personality")
    if task.child_subreaper:
        batch.call(sysnr.PRCTL, sysnr.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0, what="subreaper")
    if task.pdeathsig and pdeathsig:
        batch.call(sysnr.PRCTL, sysnr.PR_SET_PDEATHSIG, task.pdeathsig, 0, 0, 0,
                   what="pdeathsig")


def restore_thread_attrs(batch, th: image_pb2.Thread) -> None:
    name = th.comm.encode()[:15] + b"\0"
    batch.call(sysnr.PRCTL, sysnr.PR_SET_NAME, batch.put(name), 0, 0, 0, what="PR_SET_NAME")
    if th.sched_policy != 0:
        batch.call(sysnr.SCHED_SETSCHEDULER, 0, th.sched_policy,
                   batch.put(struct.pack("<i", th.sched_priority)), what="sched_setscheduler")
    if th.timer_slack:
        batch.call(sysnr.PRCTL, sysnr.PR_SET_TIMERSLACK, th.timer_slack, 0, 0, 0,
                   what="timer slack")
    batch.call(sysnr.SETPRIORITY, PRIO_PROCESS, 0, th.nice, may_fail=True, what="setpriority")
    if th.robust_list:
        batch.call(sysnr.SET_ROBUST_LIST, th.robust_list, th.robust_list_len,
                   what="set_robust_list")
    if th.rseq_ptr:
        batch.call(sysnr.RSEQ, th.rseq_ptr, th.rseq_len, 0, th.rseq_sig, what="rseq")
    if th.clear_tid_address:
        batch.call(sysnr.SET_TID_ADDRESS, th.clear_tid_address, what="set_tid_address")


def restore_late_attrs(batch, task: image_pb2.Task, th: image_pb2.Thread) -> None:
    """After credentials (setresuid resets dumpable)."""
    batch.call(sysnr.PRCTL, sysnr.PR_SET_DUMPABLE, 1 if task.dumpable else 0, 0, 0, 0,
               what="dumpable")
    if th.no_new_privs:
        batch.call(sysnr.PRCTL, sysnr.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, what="no_new_privs")
