"""Processes named safely: (pid, start time) pairs, pidfds, the subreaper bit.

A bare pid can be reused once its process is reaped; every operation here that
acts on a process we did not just fork checks the start time from
/proc/PID/stat (field 22) after taking a pidfd, so a recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
from collections.abc import Iterator

from ckptd.kernel import procfs, syscalls

PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper(on: bool = True) -> None:
    """Adopt orphaned descendants, so the daemon reaps them instead of PID 1
    (which on this machine reaps only about once a second)."""
    syscalls.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0)


def start_time(pid: int) -> int:
    return procfs.read_stat(pid).start_time


def is_running(pid: int, start: int) -> bool:
    """The process (pid, start) exists and has not exited (zombies have)."""
    try:
        stat = procfs.read_stat(pid)
    except ProcessLookupError:
        return False
    return stat.start_time == start and not stat.is_zombie


def open_pidfd(pid: int, start: int) -> int:
    """A pidfd for exactly the process (pid, start); ProcessLookupError if it
    is gone or the pid now names another process."""
    fd = os.pidfd_open(pid)
    try:
        # Checked after opening: the pidfd pins the process, so if the start
        # time still matches now, the pidfd refers to the one we mean.
        if start_time(pid) != start:
            raise ProcessLookupError(errno.ESRCH, "pid was reused by another process", pid)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def pidfd(pid: int, start: int) -> Iterator[int]:
    fd = open_pidfd(pid, start)
    try:
        yield fd
    finally:
        os.close(fd)


def send_signal(fd: int, sig: int) -> None:
    signal.pidfd_send_signal(fd, sig)


def wait_exit(fd: int, timeout: float) -> bool:
    """Wait until the pidfd's process has exited; False on timeout."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def caught_signals(pid: int) -> frozenset[int]:
    return procfs.parse_signal_mask(procfs.read_status(pid)["SigCgt"])


def drops_signal(pid: int, sig: int) -> bool:
    """Whether the kernel drops ``sig`` sent to ``pid`` from outside: pid is
    the init of its PID namespace and has no handler for it (SIGKILL and
    SIGSTOP sent from an ancestor namespace always get through)."""
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        return False
    fields = procfs.read_status(pid)
    if fields.get("NSpid", "").split()[-1:] != ["1"]:
        return False
    return sig not in procfs.parse_signal_mask(fields["SigCgt"])


CLONE_INTO_CGROUP = 0x200000000


def fork_into_cgroup(cgroup_dir_fd: int) -> int:
    """fork(), with the child born in the cgroup2 directory ``cgroup_dir_fd``.

    Moving a task into a cgroup afterwards takes the kernel's global
    cgroup_threadgroup_rwsem for writing, which waits for an RCU grace period:
    ~18 ms here, most of a container start. A child created in place does not
    migrate. For a single-threaded caller only (like the shim): it does what
    os.fork() does around the system call, but through clone3. Returns 0 in
    the child, the child's pid in the parent; OSError if clone3 refuses (e.g.
    not a cgroup2 directory), with nothing created."""
    args = syscalls.clone_args(flags=CLONE_INTO_CGROUP, cgroup=cgroup_dir_fd)
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    pid = syscalls.libc().syscall(syscalls.SYS_CLONE3, args,
                                  ctypes.c_size_t(syscalls.CLONE_ARGS.size))
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone3 into a cgroup: {os.strerror(err)}")
    return pid
