"""The image file, readied before the tree is frozen.

What a checkpoint costs its processes is the time they stay frozen. Writing a
large image into a new file spends most of that time allocating and first
touching the file's pages (kernel/prefault.py): so, while the tree
still runs, the file is given the size the image is expected to reach, and
its pages are faulted in from every CPU and kept mapped. The frozen dump
then reads the task's pages straight into the mapping (MappedSink.take).
The file is cut back to what was written at the end, whether the dump
succeeded or not. Anything but a fresh read-write file on a local file system
(tmpfs, ext4, xfs, btrfs) is left alone: pipes and sockets stream.
"""

from __future__ import annotations

import fcntl
import io
import os
import stat
import time
from collections.abc import Callable
from typing import Any

import structlog

from ..kernel import prefault, procfs, proctask

log = structlog.get_logger(__name__)

# Below this the whole write takes a few ms: not worth a mapping and threads.
MIN_PREFAULT = 32 << 20
# Left free on the file system: an estimate too high must not fill it.
KEEP_FREE = 64 << 20
# Room for what goes with the pages (metadata records, record headers).
SLACK = 1 << 20
# Progress of a long preparation (tens of GiB take seconds), at most this often.
PROGRESS_EVERY = 0.1


class MappedSink:
    """The image sink over a prepared file: bytes are stored into its
    mapping, page data is read into it in place (``take``); what goes past
    the prepared size is written to the file at its place."""

    def __init__(self, fd: int, start: int, view: memoryview) -> None:
        self.fd = fd
        self.start = start
        self._view = view
        self.pos = 0

    def write(self, data: Any) -> int:
        data = memoryview(data).cast("B")
        room = max(0, min(data.nbytes, self._view.nbytes - self.pos))
        self._view[self.pos:self.pos + room] = data[:room]
        at = room
        while at < data.nbytes:
            at += os.pwrite(self.fd, data[at:], self.start + self.pos + at)
        self.pos += data.nbytes
        return data.nbytes

    def take(self, n: int) -> memoryview | None:
        if self.pos + n > self._view.nbytes:
            return None
        self.pos += n
        return self._view[self.pos - n:self.pos]

    def flush(self) -> None:
        pass   # a shared mapping: the stores are the file's already

    def fileno(self) -> int:
        return self.fd


class Prepared:
    """A file readied for an image: sized, its pages faulted in and mapped."""

    def __init__(self, fd: int, start: int, mapping: prefault.FileMapping) -> None:
        self.fd = fd
        self.start = start
        self.size = mapping.length
        self._mapping = mapping
        self._view: memoryview | None = mapping.view()
        self.sink = MappedSink(fd, start, self._view)

    def trim(self) -> None:
        """Cut the file back to the end of what was written into it, and
        leave its position there (where a stream's reader expects it)."""
        end = self.start + self.sink.pos
        try:
            os.lseek(self.fd, end, os.SEEK_SET)
            if os.fstat(self.fd).st_size > end:
                os.ftruncate(self.fd, end)
        except OSError as e:
            # Raised from a finally: must not hide the dump's own error.
            log.error("image_file_not_trimmed", error=str(e), size=self.size)

    def close(self) -> None:
        """Unmap (after trim; tearing the mapping down takes a while, so this
        can wait until the tree runs again)."""
        if self._view is not None:
            self.sink._view = memoryview(b"")
            self._view.release()
            self._view = None
        self._mapping.close()


def prepare(sink: Any, pid: int, progress: Callable[[str, int, int], None] | None = None
            ) -> Prepared | None:
    """Ready the file behind ``sink`` for the image of the tree at ``pid``;
    None if there is nothing to do (not a local file, a small tree)."""
    fd = _fresh_local_file(sink)
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
    mapping: prefault.FileMapping | None = None
    try:
        os.ftruncate(fd, start + want)
        mapping = prefault.FileMapping(fd, start, want)
        mapping.populate(len(os.sched_getaffinity(0)), _every(PROGRESS_EVERY, progress, want))
    except OSError as e:
        # Only a head start: the write allocates its own pages without it.
        log.info("image_file_not_prepared", error=str(e))
        if mapping is not None:
            mapping.close()
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass   # never grown (a sealed memfd, say): nothing to take back
        return None
    log.debug("image_file_prepared", bytes=want, ms=round((time.monotonic() - began) * 1000, 1))
    return Prepared(fd, start, mapping)


def _every(seconds: float, progress: Callable[[str, int, int], None] | None, total: int
           ) -> Callable[[int], None] | None:
    if progress is None:
        return None
    last = [time.monotonic()]

    def report(done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= seconds:
            last[0] = now
            progress("preparing the image file", done, total)
    return report


def tree_memory(pid: int) -> int:
    """What the tree's memory pages should take in the image: each process's
    anonymous, shared-memory and swapped bytes (the kernel's counters in
    /proc/PID/status: no page table walk). Exact enough to size a file;
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
            status = procfs.read_status(p)
            todo += proctask.read_children(p)
        except (FileNotFoundError, ProcessLookupError):
            continue   # gone meanwhile: nothing of it to write
        total += sum(_kib(status.get(key, "")) for key in ("RssAnon", "RssShmem", "VmSwap"))
    return total


def _kib(value: str) -> int:
    """A status value such as "1024 kB", in bytes; 0 if absent (kernel threads)."""
    number, _, unit = value.partition(" ")
    return int(number) << 10 if number.isdigit() and unit == "kB" else 0


def _fresh_local_file(sink: Any) -> int | None:
    """The descriptor behind ``sink`` if it is a read-write regular file on
    a local file system with nothing past its position; else None."""
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
        if (st.st_size != os.lseek(fd, 0, os.SEEK_CUR)
                or prefault.fs_type(fd) not in prefault.LOCAL_FS):
            return None
    except OSError:
        return None   # not a file we can reason about: write it as it comes
    return fd
