"""Raw libc calls that Python 3.11's ``os`` module lacks, through ctypes.

Only the binding lives here: each wrapper turns a -1 return into
``OSError(errno, message, target)`` so callers see the kernel's own answer.
Constants belong to the module that owns the kernel object (namespaces.py,
process.py); this module knows syscalls, not their meaning.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import struct


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, for the calls Python's os module lacks.

    Loaded on first use, not at import: importing ckptd.kernel must stay cheap
    and side-effect free (the shim imports it on every container start)."""
    c = ctypes.CDLL(None, use_errno=True)
    c.syscall.restype = ctypes.c_long
    c.unshare.argtypes = [ctypes.c_int]
    c.unshare.restype = ctypes.c_int
    c.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p]
    c.mount.restype = ctypes.c_int
    c.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong, ctypes.c_ulong]
    c.prctl.restype = ctypes.c_int
    return c


def _fail(call: str, target: object) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call} failed: {os.strerror(err)}", str(target))


def _encode(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


class Iovec(ctypes.Structure):
    """struct iovec."""
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


SYS_CLONE3 = 435
CLONE_ARGS = struct.Struct("<11Q")   # struct clone_args up to the cgroup field (5.7)


def clone_args(*, flags: int = 0, exit_signal: int = signal.SIGCHLD, set_tid: int = 0,
               set_tid_size: int = 0, cgroup: int = 0) -> ctypes.Array:
    """A clone3 argument block (no stack: the child returns like fork's)."""
    packed = CLONE_ARGS.pack(flags, 0, 0, 0, exit_signal, 0, 0, 0, set_tid, set_tid_size, cgroup)
    return ctypes.create_string_buffer(packed, CLONE_ARGS.size)


def unshare(flags: int) -> None:
    if libc().unshare(flags) != 0:
        raise _fail("unshare", f"flags={flags:#x}")


def setns(fd: int, nstype: int) -> None:
    if libc().setns(fd, nstype) != 0:
        raise _fail("setns", fd)


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    if libc().mount(_encode(source), _encode(target), _encode(fstype), flags,
                    _encode(data)) != 0:
        raise _fail("mount", target)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    ret = libc().prctl(option, arg2, arg3, arg4, arg5)
    if ret < 0:
        raise _fail("prctl", f"option={option}")
    return ret
