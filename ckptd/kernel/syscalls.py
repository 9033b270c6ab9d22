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


@functools.cache
def _libc() -> ctypes.CDLL:
    # Loaded on first use, not at import: importing ckptd.kernel must stay cheap
    # and side-effect free (the shim imports it on every container start).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.unshare.restype = ctypes.c_int
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_ulong, ctypes.c_char_p]
    libc.mount.restype = ctypes.c_int
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong, ctypes.c_ulong]
    libc.prctl.restype = ctypes.c_int
    return libc


def _fail(call: str, target: object) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call} failed: {os.strerror(err)}", str(target))


def _encode(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def unshare(flags: int) -> None:
    if _libc().unshare(flags) != 0:
        raise _fail("unshare", f"flags={flags:#x}")


def setns(fd: int, nstype: int) -> None:
    if _libc().setns(fd, nstype) != 0:
        raise _fail("setns", fd)


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    libc = _libc()
    if libc.mount(_encode(source), _encode(target), _encode(fstype), flags, _encode(data)) != 0:
        raise _fail("mount", target)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    ret = _libc().prctl(option, arg2, arg3, arg4, arg5)
    if ret < 0:
        raise _fail("prctl", f"option={option}")
    return ret
