"""Allocating a file's pages ahead of the data, from several CPUs.

A write into a new file allocates and first touches one page (tmpfs, or the
page cache of a disk file system) per 4 KiB while the writer waits. On a VM
that hands freed memory back to its host (free page reporting), that first
touch is a host fault, 2-5x the cost of the copy itself, and write() takes
the inode lock, so one writer pays it alone. Faulting the pages in through a
shared mapping takes no inode lock: several threads can do it side by side
(MADV_POPULATE_WRITE, Linux 5.14).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable

from . import syscalls

TMPFS_MAGIC = 0x01021994
# File systems whose shared mappings are plain page cache on this machine:
# faulting in is cheap and reliable (not so on network file systems).
LOCAL_FS = {TMPFS_MAGIC: "tmpfs", 0xEF53: "ext4", 0x58465342: "xfs", 0x9123683E: "btrfs"}
MADV_POPULATE_WRITE = 23
PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_SHARED = 0x01
MAP_FAILED = ctypes.c_void_p(-1).value
# One madvise call: large enough that the call costs nothing next to its
# faults, small enough that threads share the work evenly.
STEP = 16 << 20
MAX_THREADS = 4   # past the machine's own CPUs more threads only contend


class _Statfs(ctypes.Structure):
    # struct statfs (x86_64): only f_type is read.
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]


def _bind() -> ctypes.CDLL:
    c = syscalls.libc()
    c.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_Statfs)]
    c.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
    c.mmap.restype = ctypes.c_void_p
    c.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    c.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return c


def fs_type(fd: int) -> int:
    """The magic number of the file system ``fd`` is on (statfs(2))."""
    buf = _Statfs()
    if _bind().fstatfs(fd, ctypes.byref(buf)) != 0:
        raise OSError(ctypes.get_errno(), "fstatfs failed", fd)
    return buf.f_type & 0xFFFFFFFF


class FileMapping:
    """A shared read-write mapping of [offset, offset + length) of a file.

    Bytes stored through ``view()`` are the file's. ``populate`` faults the
    pages in; while the mapping lives their page table entries stay, so the
    stores (and process_vm_readv into it) take no fault. ``close`` unmaps;
    no view may be used after it."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        if length <= 0:
            raise ValueError(f"nothing to map ({length} bytes)")
        self._c = _bind()
        self.fd = fd
        self.length = length
        self._skew = offset % os.sysconf("SC_PAGE_SIZE")   # mmap wants an aligned offset
        self._span = length + self._skew
        base = self._c.mmap(None, self._span, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                            offset - self._skew)
        if base in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap of the image file failed", fd)
        self._base: int | None = base
        self.address = base + self._skew

    def view(self) -> memoryview:
        if self._base is None:
            raise ValueError("the mapping is closed")
        return memoryview((ctypes.c_char * self.length).from_address(self.address)).cast("B")

    def populate(self, threads: int, progress: Callable[[int], None] | None = None) -> None:
        """Fault every page in as written, ``threads`` at a time. Contents
        already there are kept; holes become zero pages. ``progress`` gets
        the bytes done so far, from the calling thread, after each step."""
        assert self._base is not None
        base, span, c = self._base, self._span, self._c
        n = max(1, min(threads, MAX_THREADS))
        failures: list[OSError] = []
        done = [0] * n   # per thread: no lock needed, the sum is only a progress figure

        def work(first: int) -> None:
            for at in range(first * STEP, span, STEP * n):
                if failures:
                    return
                step = min(STEP, span - at)
                if c.madvise(base + at, step, MADV_POPULATE_WRITE) != 0:
                    failures.append(OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_WRITE)"
                                            " of the image file failed", self.fd))
                    return
                done[first] += step
                if first == 0 and progress is not None:
                    progress(min(sum(done), self.length))

        helpers = [threading.Thread(target=work, args=(k,), name=f"ckptd-prefault-{k}")
                   for k in range(1, n)]
        for t in helpers:
            t.start()
        work(0)
        for t in helpers:
            t.join()
        if failures:
            raise failures[0]

    def close(self) -> None:
        if self._base is not None:
            self._c.munmap(self._base, self._span)
            self._base = None


def populate(fd: int, offset: int, length: int, threads: int) -> None:
    """Fault in [offset, offset + length) of the file behind ``fd`` (opened
    read-write, at least that long), ``threads`` at a time (FileMapping)."""
    if length <= 0:
        return
    m = FileMapping(fd, offset, length)
    try:
        m.populate(threads)
    finally:
        m.close()
