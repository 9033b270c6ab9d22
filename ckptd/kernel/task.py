"""Creating a task with a chosen pid (clone3 ``set_tid``), taking another
task's fds (``pidfd_getfd``), reading another thread's robust list."""

from __future__ import annotations

import ctypes
import os

from ckptd.kernel.syscalls import CLONE_ARGS, SYS_CLONE3, clone_args, libc

SYS_PIDFD_GETFD = 438
SYS_KCMP = 312
SYS_GET_ROBUST_LIST = 274
KCMP_FILE = 0
KCMP_VM = 1
KCMP_FILES = 2
KCMP_FS = 3
KCMP_SIGHAND = 4



def spawn_with_pid(pid: int, path: str, argv: list[str]) -> int:
    """Fork a child with pid ``pid`` (in the caller's PID namespace) that execs
    ``path`` at once. EEXIST if the pid is taken."""
    tids = (ctypes.c_int32 * 1)(pid)
    args = clone_args(set_tid=ctypes.addressof(tids), set_tid_size=1)
    path_b = os.fsencode(path)
    argv_b = [os.fsencode(a) for a in argv]
    env: dict[str, str] = {}
    ret = libc().syscall(ctypes.c_long(SYS_CLONE3), args, ctypes.c_size_t(CLONE_ARGS.size))
    if ret == 0:
        # The child: nothing but exec (it shares no state worth keeping).
        try:
            os.execve(path_b, argv_b, env)
        finally:
            os._exit(127)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clone3 with pid {pid} failed: {os.strerror(err)}", pid)
    return ret


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    ret = libc().syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_long(pidfd),
                          ctypes.c_long(target_fd), ctypes.c_ulong(0))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd of fd {target_fd} failed: {os.strerror(err)}",
                      target_fd)
    return ret


def same_file(pid: int, fd1: int, fd2: int) -> bool:
    """Whether two fds of ``pid`` share one open file description (kcmp)."""
    return same_file_across(pid, fd1, pid, fd2)


def same_file_across(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """Whether fd1 of pid1 and fd2 of pid2 are one open file description (kcmp)."""
    ret = libc().syscall(ctypes.c_long(SYS_KCMP), ctypes.c_long(pid1), ctypes.c_long(pid2),
                          ctypes.c_long(KCMP_FILE), ctypes.c_ulong(fd1), ctypes.c_ulong(fd2))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"kcmp of fds {pid1}:{fd1} and {pid2}:{fd2} failed: "
                      f"{os.strerror(err)}", pid1)
    return ret == 0


def kcmp(pid1: int, pid2: int, kind: int) -> int:
    """Order of two tasks' kernel objects of ``kind`` (KCMP_VM, _FILES, _FS):
    0 the same object, 1 or 2 less or greater (an arbitrary but stable order)."""
    ret = libc().syscall(ctypes.c_long(SYS_KCMP), ctypes.c_long(pid1), ctypes.c_long(pid2),
                          ctypes.c_long(kind), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"kcmp of {pid1} and {pid2} failed: {os.strerror(err)}", pid1)
    return ret


def robust_list(tid: int) -> tuple[int, int]:
    """A thread's robust futex list head and its length (get_robust_list)."""
    head, size = ctypes.c_ulong(), ctypes.c_size_t()
    ret = libc().syscall(ctypes.c_long(SYS_GET_ROBUST_LIST), ctypes.c_long(tid),
                          ctypes.byref(head), ctypes.byref(size))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"get_robust_list of {tid} failed: {os.strerror(err)}", tid)
    return head.value, size.value
