"""The image file, readied before the tree is frozen.

What a checkpoint costs its processes is the time they stay frozen. Writing a
large image into a new tmpfs file spends most of that time allocating and
first touching the file's pages (kernel/prefault.py): so, while the tree
still runs, the file is given the size the image is expected to reach and
its pages are faulted in from every CPU. The frozen write then only copies.
The file is cut back to what was written at the end, whether the dump
succeeded or not. Anything but a fresh read-write tmpfs file is left alone.
"""

from __future__ import annotations

import fcntl
import io
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ..kernel import prefault, proctask

log = structlog.get_logger(__name__)

# Below this the whole write takes a few ms: not worth a mapping and threads.
MIN_PREFAULT = 32 << 20
# Left free on the file system: an estimate too high must not fill it.
KEEP_FREE = 64 << 20
# Room for what goes with the pages (metadata records, record headers).
SLACK = 1 << 20


@dataclass(frozen=True)
class Prepared:
    fd: int
    start: int       # where the image begins in the file
    size: int        # how long the file was made

    def trim(self, sink: Any) -> None:
        """Cut the file back to the end of what was written into it."""
        try:
            sink.flush()
        except (OSError, ValueError):
            pass   # a failed or closed sink: its position below still tells the truth
        try:
            end = os.lseek(self.fd, 0, os.SEEK_CUR)
            if os.fstat(self.fd).st_size > end:
                os.ftruncate(self.fd, end)
        except OSError as e:
            # Raised from a finally: must not hide the dump's own error.
            log.error("image_file_not_trimmed", error=str(e), size=self.size)


def prepare(sink: Any, pid: int, progress: Callable[[str, int, int], None] | None = None
            ) -> Prepared | None:
    """Ready the file behind ``sink`` for the image of the tree at ``pid``;
    None if there is nothing to do (not a file, not tmpfs, a small tree)."""
    fd = _fresh_tmpfs_file(sink)
    if fd is None:
        return None
    start = os.lseek(fd, 0, os.SEEK_CUR)
    st = os.fstatvfs(fd)
    want = min(tree_memory(pid) + SLACK, st.f_bavail * st.f_frsize - KEEP_FREE)
    if want < MIN_PREFAULT:
        return None
    began = time.monotonic()
    if progress:
        progress("preparing the image file", 0, want)
    try:
        os.ftruncate(fd, start + want)
        prefault.populate(fd, start, want, len(os.sched_getaffinity(0)))
    except OSError as e:
        # Only a head start: the write allocates its own pages without it.
        log.info("image_file_not_prepared", error=str(e))
        os.ftruncate(fd, start)
        return None
    log.debug("image_file_prepared", bytes=want, ms=round((time.monotonic() - began) * 1000, 1))
    return Prepared(fd, start, want)


def tree_memory(pid: int) -> int:
    """What the tree's memory pages should take in the image: each process's
    anonymous, swapped and shared-memory bytes. Exact enough to size a file;
    processes that come or go meanwhile are simply missed or skipped."""
    total = 0
    todo = [pid]
    seen: set[int] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            rollup = proctask.read_smaps_rollup(p)
            todo += proctask.read_children(p)
        except (FileNotFoundError, ProcessLookupError):
            continue
        except PermissionError:
            continue   # a kernel thread or a process we may not read: no pages of ours
        total += rollup.get("Anonymous", 0) + rollup.get("Swap", 0) + rollup.get("Pss_Shmem", 0)
    return total


def _fresh_tmpfs_file(sink: Any) -> int | None:
    """The descriptor behind ``sink`` if it is a read-write regular file on
    tmpfs with nothing past its position; else None."""
    try:
        sink.flush()
        fd = sink.fileno()
    except (AttributeError, io.UnsupportedOperation, ValueError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        # A shared mapping needs a read-write descriptor (ckptctl's files
        # are); appending writes would land past the prepared size.
        if flags & os.O_ACCMODE != os.O_RDWR or flags & os.O_APPEND:
            return None
        if st.st_size != os.lseek(fd, 0, os.SEEK_CUR) or not prefault.is_tmpfs(fd):
            return None
    except OSError:
        return None   # not a file we can reason about: write it as it comes
    return fd
