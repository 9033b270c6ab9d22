"""Namespaces and the mounts a new one needs: unshare, private propagation,
a fresh procfs, the hostname, and namespace identity for checks.
"""

from __future__ import annotations

import enum
import os
import socket
import threading
from pathlib import Path

from ckptd.kernel import syscalls

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 0x40000


class Namespace(enum.Enum):
    """Value: the name under /proc/PID/ns/."""

    MNT = "mnt"
    UTS = "uts"
    IPC = "ipc"
    PID = "pid"
    NET = "net"

    @property
    def clone_flag(self) -> int:
        return _CLONE_FLAGS[self]


_CLONE_FLAGS = {
    Namespace.MNT: 0x00020000,   # CLONE_NEWNS
    Namespace.UTS: 0x04000000,
    Namespace.IPC: 0x08000000,
    Namespace.PID: 0x20000000,   # affects only children created afterwards
    Namespace.NET: 0x40000000,
}


def unshare(*namespaces: Namespace) -> None:
    flags = 0
    for ns in namespaces:
        flags |= ns.clone_flag
    syscalls.unshare(flags)


def ns_inode(pid: int | str, ns: Namespace) -> int:
    """Two processes share a namespace iff these inode numbers are equal."""
    return os.stat(Path("/proc") / str(pid) / "ns" / ns.value).st_ino


def make_mounts_private() -> None:
    """Stop mount events crossing between this mount namespace and the host's,
    in both directions (a /proc mounted here must not appear on the host)."""
    syscalls.mount(None, "/", None, MS_REC | MS_PRIVATE)


def mount_proc(target: str = "/proc") -> None:
    """Mount a procfs of the caller's PID namespace over ``target``."""
    syscalls.mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def set_hostname(name: str) -> None:
    socket.sethostname(name)


def set_domainname(name: str) -> None:
    """The NIS domain name of the caller's UTS namespace (what a restored
    container had); the sysctl file is the UTS namespace's own."""
    with open("/proc/sys/kernel/domainname", "w") as f:
        f.write(name)


def uts_names(pid: int) -> tuple[str, str]:
    """(hostname, domainname) as seen inside ``pid``'s UTS namespace.

    Read by a short-lived thread that joins that namespace: setns of a UTS
    namespace changes only the calling thread, so the rest of the process
    (and a ptrace attachment held by another thread) is untouched."""
    result: list[tuple[str, str]] = []
    failure: list[OSError] = []

    def peek() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
            try:
                syscalls.setns(fd, Namespace.UTS.clone_flag)
            finally:
                os.close(fd)
            with open("/proc/sys/kernel/domainname") as f:
                domain = f.read().strip()
            result.append((os.uname().nodename, "" if domain == "(none)" else domain))
        except OSError as e:
            failure.append(e)
    thread = threading.Thread(target=peek, name="uts-peek")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]
