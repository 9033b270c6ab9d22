"""File locks: flock, POSIX (fcntl F_SETLK) and open file description
(F_OFD_SETLK) locks held through a task's fds.

Dump: the ``lock:`` lines of /proc/PID/fdinfo/FD, which list the locks this
process (POSIX) or this open file description (flock, OFD) holds on the
file through that fd. A lease or delegation is refused.

Restore: taken again without waiting (LOCK_NB, F_SETLK): the dumped
process, killed, has released them; someone else holding a conflicting lock
by now makes the restore fail naming the file. flock and OFD locks belong
to the description: taken once, by the process that opens it, right then.
POSIX locks belong to the process and go with any close of the file: taken
last, once the restore closes no fd of the task any more.
"""

from __future__ import annotations

import struct

from ckptd.errors import ImageError, UnsupportedError
from ckptd.kernel import sysnr
from ckptd.v1 import image_pb2

KINDS = {"FLOCK": "flock", "POSIX": "posix", "OFDLCK": "ofd"}
LOCK_SH, LOCK_EX, LOCK_NB = 1, 2, 4
F_RDLCK, F_WRLCK = 0, 1
F_SETLK, F_OFD_SETLK = 6, 37
_FLOCK = struct.Struct("<hhxxxxqqixxxx")      # struct flock on x86_64
MAX_OFFSET = (1 << 63) - 1
# More than this on one fd is not an image we wrote (RLIMIT_LOCKS-ish bound).
MAX_LOCKS = 1024


def parse(lines: list[str], pid: int, fd: int) -> list[image_pb2.FileLock]:
    """``lock:`` values of an fdinfo, e.g. ``1: POSIX  ADVISORY  WRITE 42
    fe:00:123 100 149``; UnsupportedError for a kind we cannot take again."""
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) < 8:
            raise UnsupportedError(f"pid {pid} fd {fd}: unreadable lock {line!r}", pid=pid,
                                   fd=fd, kind="file lock")
        kind, _, mode, start, end = parts[1], parts[2], parts[3], parts[6], parts[7]
        if kind not in KINDS or mode not in ("READ", "WRITE"):
            raise UnsupportedError(f"pid {pid} holds a {kind} {mode} on fd {fd}, which cannot "
                                   "be checkpointed", pid=pid, fd=fd, kind="file lock")
        first = int(start)
        length = 0 if end == "EOF" else int(end) - first + 1
        out.append(image_pb2.FileLock(kind=KINDS[kind], write=mode == "WRITE", start=first,
                                      length=length))
    return out


def check(f: image_pb2.Fd) -> None:
    if len(f.locks) > MAX_LOCKS:
        raise ImageError(f"fd {f.fd} has {len(f.locks)} locks", record="FILES")
    for lk in f.locks:
        if lk.kind not in KINDS.values() or lk.start > MAX_OFFSET or lk.length > MAX_OFFSET:
            raise ImageError(f"fd {f.fd} has a bad {lk.kind!r} lock", record="FILES")
        if lk.kind == "flock" and (lk.start or lk.length):
            raise ImageError(f"fd {f.fd} has a flock with a byte range", record="FILES")


def restore(batch, f: image_pb2.Fd) -> None:
    """Take ``f``'s flock and OFD locks, right after the task opened its
    description (they belong to it, so a task that took the description from
    another does not call this)."""
    for lk in f.locks:
        if lk.kind == "flock":
            batch.call(sysnr.FLOCK, f.fd, (LOCK_EX if lk.write else LOCK_SH) | LOCK_NB,
                       what=_what(f, lk))
        elif lk.kind == "ofd":
            _fcntl(batch, f, lk, F_OFD_SETLK)


def restore_posix(batch, files: image_pb2.Files) -> None:
    """Take the task's POSIX locks, once it closes no fd any more: closing any
    fd of a file drops all of the process's POSIX locks on it (the temporary
    fds of the layout would)."""
    for f in files.fds:
        for lk in f.locks:
            if lk.kind == "posix":
                _fcntl(batch, f, lk, F_SETLK)


def _fcntl(batch, f: image_pb2.Fd, lk: image_pb2.FileLock, cmd: int) -> None:
    arg = batch.put(_FLOCK.pack(F_WRLCK if lk.write else F_RDLCK, 0, lk.start, lk.length, 0), 8)
    batch.call(sysnr.FCNTL, f.fd, cmd, arg, what=_what(f, lk))


def _what(f: image_pb2.Fd, lk: image_pb2.FileLock) -> str:
    return (f"take back the {'write' if lk.write else 'read'} {lk.kind} lock on {f.path} "
            f"(fd {f.fd}; does another process hold a conflicting one?)")
