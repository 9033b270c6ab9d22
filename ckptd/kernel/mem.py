"""Another process's memory: which pages exist (PAGEMAP_SCAN, pagemap) and
their contents in bulk (process_vm_readv, /proc/PID/mem).

Nothing here loops over pages in Python: the scan returns ranges, and reads
and writes move whole ranges in one syscall each.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from dataclasses import dataclass

from ckptd.kernel.syscalls import Iovec, libc

SYS_PROCESS_VM_READV = 310

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# PAGEMAP_SCAN (Linux 6.7): _IOWR('f', 16, struct pm_scan_arg) with its 96 bytes.
PAGEMAP_SCAN = 0xC0606610
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6

# Ranges asked for per ioctl: a process has a few hundred ranges typically;
# 4096 x 24 bytes is one 96 KiB buffer, reused.
SCAN_VECTOR = 4096

_SCAN_ARG = struct.Struct("<12Q")
_REGION = struct.Struct("<QQQ")

# pagemap(5) fallback bits.
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE = 1 << 61


@dataclass(frozen=True)
class PageRange:
    start: int
    end: int
    categories: int

    @property
    def is_file(self) -> bool:
        return bool(self.categories & PAGE_IS_FILE)

    @property
    def is_zero(self) -> bool:
        return bool(self.categories & PAGE_IS_PFNZERO)

    @property
    def is_swapped(self) -> bool:
        return bool(self.categories & PAGE_IS_SWAPPED)




def scan_present(pagemap_fd: int, start: int, end: int) -> list[PageRange]:
    """Ranges of pages present in RAM or swapped in [start, end), each with its
    PAGE_IS_* categories (FILE, SWAPPED, PFNZERO, PRESENT)."""
    vec = ctypes.create_string_buffer(_REGION.size * SCAN_VECTOR)
    vec_addr = ctypes.addressof(vec)
    out: list[PageRange] = []
    cursor = start
    want = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
    ret_mask = want | PAGE_IS_FILE | PAGE_IS_PFNZERO
    while cursor < end:
        arg = bytearray(_SCAN_ARG.pack(_SCAN_ARG.size, 0, cursor, end, 0, vec_addr,
                                       SCAN_VECTOR, 0, 0, 0, want, ret_mask))
        n = fcntl.ioctl(pagemap_fd, PAGEMAP_SCAN, arg, True)
        raw = vec.raw
        for i in range(n):
            s, e, cat = _REGION.unpack_from(raw, i * _REGION.size)
            out.append(PageRange(s, e, cat))
        walk_end = _SCAN_ARG.unpack(arg)[4]
        # walk_end can stop short of end although the walk is complete
        # (MACHINE.md): a vector that was not filled means done.
        if n < SCAN_VECTOR or walk_end <= cursor:
            break
        cursor = walk_end
    return out


def scan_present_pagemap(pagemap_fd: int, start: int, end: int) -> list[PageRange]:
    """The same from /proc/PID/pagemap, for kernels without PAGEMAP_SCAN."""
    out: list[PageRange] = []
    npages = (end - start) // PAGE_SIZE
    raw = os.pread(pagemap_fd, npages * 8, start // PAGE_SIZE * 8)
    entries = memoryview(raw).cast("Q")
    run_start = None
    run_cat = 0
    for i, entry in enumerate(entries):
        cat = 0
        if entry & PM_PRESENT:
            cat = PAGE_IS_PRESENT | (PAGE_IS_FILE if entry & PM_FILE else 0)
            if entry & ((1 << 55) - 1) == 0 and not entry & PM_FILE:
                pass  # pfn hidden without CAP_SYS_ADMIN: cannot tell the zero page
        elif entry & PM_SWAPPED:
            cat = PAGE_IS_SWAPPED
        if cat != run_cat or not cat:
            if run_start is not None and run_cat:
                out.append(PageRange(run_start, start + i * PAGE_SIZE, run_cat))
            run_start, run_cat = (start + i * PAGE_SIZE, cat) if cat else (None, 0)
    if run_start is not None and run_cat:
        out.append(PageRange(run_start, end, run_cat))
    return out


def read_into(pid: int, addr: int, buf: memoryview) -> int:
    """process_vm_readv of len(buf) bytes at ``addr`` into ``buf``; bytes read."""
    return read_scatter(pid, addr, [buf])


def read_scatter(pid: int, addr: int, bufs: list[memoryview]) -> int:
    """process_vm_readv of the bytes from ``addr`` on into ``bufs`` in turn
    (one call); bytes read, which stop short at the first unreadable page."""
    local = (Iovec * len(bufs))()
    held = []
    for i, buf in enumerate(bufs):
        cbuf = (ctypes.c_char * buf.nbytes).from_buffer(buf)
        held.append(cbuf)
        local[i] = Iovec(ctypes.addressof(cbuf), buf.nbytes)
    total = sum(b.nbytes for b in bufs)
    remote = Iovec(addr, total)
    n = libc().syscall(ctypes.c_long(SYS_PROCESS_VM_READV), ctypes.c_long(pid),
                        local, ctypes.c_ulong(len(bufs)), ctypes.byref(remote),
                        ctypes.c_ulong(1), ctypes.c_ulong(0))
    del held
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"process_vm_readv at {addr:#x} failed: {os.strerror(err)}", pid)
    return n


def open_mem(pid: int, write: bool = False) -> int:
    return os.open(f"/proc/{pid}/mem", (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)


def pread_exact(fd: int, buf: memoryview, addr: int, pid: int) -> None:
    done = 0
    while done < buf.nbytes:
        n = os.preadv(fd, [buf[done:]], addr + done)
        if n <= 0:
            raise OSError(5, f"short read of /proc/{pid}/mem at {addr + done:#x}", pid)
        done += n


def pwrite_exact(fd: int, data: memoryview | bytes, addr: int, pid: int) -> None:
    view = memoryview(data)
    done = 0
    while done < view.nbytes:
        n = os.pwrite(fd, view[done:], addr + done)
        if n <= 0:
            raise OSError(5, f"short write to /proc/{pid}/mem at {addr + done:#x}", pid)
        done += n
