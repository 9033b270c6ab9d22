"""The address space: VMAs, mm fields, vdso, and page contents.

Dump: VMAs from /proc/PID/smaps, present pages from PAGEMAP_SCAN, contents
read in big slices straight into the image writer. Pages not stored: those
of shared file mappings (they live in the file), file pages of private file
mappings that were never written (PAGE_IS_FILE: still the file's page), the
shared zero page, and never-touched pages. MAP_SHARED|MAP_ANONYMOUS memory
is not read here but once per object, by shared.py (several processes or
VMAs may map one object).

Restore: one batch maps every VMA at its address with its final protection,
then page records are written through /proc/PID/mem (FOLL_FORCE: no
mprotect needed), each while the next is read, then PR_SET_MM_MAP sets the
mm fields and the exe. Shared anonymous memory is mapped and filled as
shared.py says (one object, however many tasks map it).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import stat as stat_mod
import struct
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import structlog

from ckptd.errors import ImageError, StateError, UnsupportedError
from ckptd.image.reader import PageRecord
from ckptd.image.writer import ImageWriter
from ckptd.kernel import mem, proctask, sysnr
from ckptd.v1 import image_pb2

log = structlog.get_logger(__name__)

PAGE = mem.PAGE_SIZE
TASK_SIZE = (1 << 47) - PAGE        # x86_64 4-level user address space
MMAP_MIN_ADDR = 0x1000
VDSO_NAMES = ("[vvar]", "[vvar_vclock]", "[vdso]")
# VmFlags we cannot recreate: device/PFN maps, userfaultfd, shadow stack, sealed.
UNSUPPORTED_VMFLAGS = {"io": "I/O mapping", "pf": "PFN mapping", "um": "userfaultfd mapping",
                       "uw": "userfaultfd mapping", "ss": "shadow stack", "sl": "sealed mapping"}
# Page data is read in slices of this size: big enough that the syscall and
# record overheads vanish (1 GiB = 64 slices), small enough to stay in cache-
# friendly territory and not hold hundreds of MiB of worker memory.
READ_SLICE = 16 << 20
# Page records written into the task at once while the next is read: two,
# so that two CPUs take the faults of the task's new pages (each costs a
# host fault on a VM that reclaims freed memory: one writer alone waits).
FILL_AHEAD = 2
MAX_AUXV = 2 * 8 * 64           # AT_VECTOR_SIZE_BASE-ish bound the kernel checks too


@dataclass(frozen=True)
class PageSpan:
    start: int
    end: int
    vma_id: int
    readable: bool


def file_stat(st: os.stat_result) -> image_pb2.FileStat:
    return image_pb2.FileStat(dev=st.st_dev, ino=st.st_ino, size=st.st_size,
                              mtime_ns=st.st_mtime_ns, mode=st.st_mode)


def vdso_fingerprint(pid: int | str = "self") -> str:
    """sha256 of the [vdso] bytes and the kernel release: restore refuses an
    image whose vdso is not this machine's (addresses inside it would lie)."""
    if pid == "self":
        return _own_vdso_fingerprint()
    return _vdso_fingerprint(pid)


@functools.cache
def _own_vdso_fingerprint() -> str:
    # Asked once per restored process; ~1 ms each (maps, mem, sha256).
    return _vdso_fingerprint("self")


def _vdso_fingerprint(pid: int | str) -> str:
    for vma in proctask.parse_smaps(open(f"/proc/{pid}/maps").read()):
        if vma.path == "[vdso]":
            with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
                f.seek(vma.start)
                data = f.read(vma.end - vma.start)
            return hashlib.sha256(data + os.uname().release.encode()).hexdigest()
    return ""


# ---------------------------------------------------------------- dump

def dump_mm(pid: int, brk: int, first_id: int = 1) -> tuple[image_pb2.Mm, list[PageSpan]]:
    """The Mm message and the page spans to store; VMA ids count from
    ``first_id`` (unique across a tree, so pages name their process). Raises UnsupportedError
    for a mapping we cannot restore, before anything is written."""
    vmas = proctask.read_smaps(pid)
    fields = proctask.read_stat_mm(pid)
    mm = image_pb2.Mm(start_code=fields.start_code, end_code=fields.end_code,
                      start_data=fields.start_data, end_data=fields.end_data,
                      start_brk=fields.start_brk, brk=brk, start_stack=fields.start_stack,
                      arg_start=fields.arg_start, arg_end=fields.arg_end,
                      env_start=fields.env_start, env_end=fields.env_end,
                      auxv=proctask.read_auxv(pid))
    exe = os.readlink(f"/proc/{pid}/exe")
    if exe.endswith(" (deleted)"):
        raise UnsupportedError(f"pid {pid} runs a deleted executable {exe}", pid=pid,
                               kind="deleted executable")
    mm.exe = exe
    mm.exe_stat.CopyFrom(file_stat(os.stat(f"/proc/{pid}/exe")))
    dumped: list[tuple[image_pb2.Vma, proctask.SmapsVma]] = []
    for v in vmas:
        if v.path == "[vsyscall]":
            continue
        if v.path in VDSO_NAMES:
            if v.path == "[vvar]" or not mm.vvar_start:
                mm.vvar_start = v.start
            if v.path == "[vdso]":
                mm.vdso_start = v.start
                mm.vdso_size = v.end - mm.vvar_start
            continue
        msg = _dump_vma(pid, v, len(dumped) + first_id)
        dumped.append((msg, v))
        mm.vmas.append(msg)
    spans = _page_spans(pid, dumped)
    return mm, spans


def _dump_vma(pid: int, v: proctask.SmapsVma, vma_id: int) -> image_pb2.Vma:
    where = dict(pid=pid, address=f"{v.start:#x}")
    for flag, what in UNSUPPORTED_VMFLAGS.items():
        if flag in v.vm_flags:
            raise UnsupportedError(f"pid {pid} has a {what} at {v.start:#x}-{v.end:#x} "
                                   f"({v.path or 'anonymous'})", kind=what, **where)
    prot = ((sysnr.PROT_READ if v.perms[0] == "r" else 0)
            | (sysnr.PROT_WRITE if v.perms[1] == "w" else 0)
            | (sysnr.PROT_EXEC if v.perms[2] == "x" else 0))
    flags = sysnr.MAP_SHARED if v.shared else sysnr.MAP_PRIVATE
    if "gd" in v.vm_flags:
        flags |= sysnr.MAP_GROWSDOWN
    if "nr" in v.vm_flags:
        flags |= sysnr.MAP_NORESERVE
    msg = image_pb2.Vma(id=vma_id, start=v.start, end=v.end, prot=prot, name=v.path,
                        locked="lo" in v.vm_flags,
                        madvise=[sysnr.MADV[f] for f in sorted(v.vm_flags) if f in sysnr.MADV])
    file_backed = v.inode != 0 and v.path.startswith("/")
    if file_backed and v.shared and v.path == "/dev/zero (deleted)":
        file_backed = False     # MAP_SHARED|MAP_ANONYMOUS shows as deleted /dev/zero
        # Its object: who else maps it (the inode), its size, where we are in it.
        msg.stat.CopyFrom(file_stat(os.stat(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}")))
        msg.pgoff = v.offset
    elif file_backed and v.path.endswith(" (deleted)"):
        raise UnsupportedError(f"pid {pid} maps a deleted file {v.path} at {v.start:#x}",
                               kind="mapping of a deleted file", **where)
    elif not file_backed and v.path.startswith("/"):
        raise UnsupportedError(f"pid {pid} has a mapping {v.path} at {v.start:#x} "
                               "of no regular file", kind="special mapping", **where)
    if file_backed:
        st = os.stat(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}")
        if not stat_mod.S_ISREG(st.st_mode):
            raise UnsupportedError(f"pid {pid} maps {v.path} at {v.start:#x}, not a regular "
                                   "file", kind="device mapping", **where)
        msg.path = v.path
        msg.pgoff = v.offset
        msg.stat.CopyFrom(file_stat(st))
        msg.file_writable = v.shared and "mw" in v.vm_flags
    else:
        flags |= sysnr.MAP_ANONYMOUS
    msg.flags = flags
    return msg


def _page_spans(pid: int, vmas: list[tuple[image_pb2.Vma, proctask.SmapsVma]]
                ) -> list[PageSpan]:
    if not vmas:
        return []
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        lo, hi = vmas[0][0].start, vmas[-1][0].end
        try:
            ranges = mem.scan_present(f.fileno(), lo, hi)
        except OSError as e:
            if e.errno not in (25, 22):   # ENOTTY/EINVAL: no PAGEMAP_SCAN
                raise
            ranges = [r for msg, _ in vmas
                      for r in mem.scan_present_pagemap(f.fileno(), msg.start, msg.end)]
    spans: list[PageSpan] = []
    i = 0
    for r in ranges:
        if r.is_zero:
            continue
        while i < len(vmas) and vmas[i][0].end <= r.start:
            i += 1
        j = i
        while j < len(vmas) and vmas[j][0].start < r.end:
            msg, _ = vmas[j]
            j += 1
            anon = bool(msg.flags & sysnr.MAP_ANONYMOUS)
            if msg.flags & sysnr.MAP_SHARED:
                continue     # contents live in the file, or are read per object (shared.py)
            if not anon and r.is_file and not r.is_swapped:
                continue     # private file page never written: the file has it
            lo, hi = max(r.start, msg.start), min(r.end, msg.end)
            if spans and spans[-1].end == lo and spans[-1].vma_id == msg.id:
                spans[-1] = PageSpan(spans[-1].start, hi, msg.id, spans[-1].readable)
            else:
                spans.append(PageSpan(lo, hi, msg.id, bool(msg.prot & sysnr.PROT_READ)))
    return spans


def write_pages(pid: int, spans: list[PageSpan], writer: ImageWriter,
                progress: Callable[[int], None] | None = None) -> int:
    """Copy every span into the image; the page bytes written. Where the
    image's sink lends room (a prepared file, imagefile.py) the pages go
    straight from the task into it; else through one reused buffer."""
    total = 0
    buf: memoryview | None = None
    memfd = -1
    try:
        for span in spans:
            addr = span.start
            while addr < span.end:
                n = min(READ_SLICE, span.end - addr)
                slots = writer.page_slots(addr, n, span.vma_id)
                if slots is not None:
                    memfd = _read_pages(pid, addr, slots.data, span.readable, memfd)
                    writer.seal_pages(slots)
                else:
                    if buf is None:
                        longest = max(s.end - s.start for s in spans)
                        buf = memoryview(bytearray(min(READ_SLICE, longest)))
                    part = buf[:n]
                    memfd = _read_pages(pid, addr, [part], span.readable, memfd)
                    writer.write_pages(addr, part, span.vma_id)
                addr += n
                total += n
                if progress is not None:
                    progress(total)
    finally:
        if memfd >= 0:
            os.close(memfd)
    return total


def _read_pages(pid: int, addr: int, bufs: list[memoryview], readable: bool, memfd: int) -> int:
    """Fill ``bufs`` with the task's bytes from ``addr`` on; the /proc/PID/mem
    descriptor, opened here the first time one is needed (else -1)."""
    got = mem.read_scatter(pid, addr, bufs) if readable else 0
    for buf in bufs:
        if got >= buf.nbytes:
            got -= buf.nbytes
        else:
            # Not readable (PROT_NONE) or partly: /proc/PID/mem forces it.
            if memfd < 0:
                memfd = mem.open_mem(pid)
            mem.pread_exact(memfd, buf[got:], addr + got, pid)
            got = 0
        addr += buf.nbytes
    return memfd


def page_bytes(spans: list[PageSpan]) -> int:
    return sum(s.end - s.start for s in spans)


# ---------------------------------------------------------------- restore

def check_mm(mm: image_pb2.Mm) -> None:
    """Everything about the Mm record that can be checked without the system."""
    prev_end = 0
    ids = set()
    for v in mm.vmas:
        where = f"VMA {v.start:#x}-{v.end:#x}"
        if v.start % PAGE or v.end % PAGE or not MMAP_MIN_ADDR <= v.start < v.end <= TASK_SIZE:
            raise ImageError(f"{where} is not a page-aligned user range", record="MM")
        if v.start < prev_end:
            raise ImageError(f"{where} overlaps the VMA before it", record="MM")
        if v.pgoff % PAGE or v.id in ids or v.id == 0:
            raise ImageError(f"{where} has a bad file offset or id", record="MM")
        if v.flags & ~(sysnr.MAP_SHARED | sysnr.MAP_PRIVATE | sysnr.MAP_ANONYMOUS
                       | sysnr.MAP_GROWSDOWN | sysnr.MAP_NORESERVE) or v.prot & ~7:
            raise ImageError(f"{where} has unknown flags {v.flags:#x}/{v.prot:#x}", record="MM")
        if not v.flags & sysnr.MAP_ANONYMOUS and not v.path.startswith("/"):
            raise ImageError(f"{where} is file-backed without a path", record="MM")
        _check_shmem(v, where)
        ids.add(v.id)
        prev_end = v.end
    for name in ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
                 "start_stack", "arg_start", "arg_end", "env_start", "env_end",
                 "vvar_start", "vdso_start"):
        if getattr(mm, name) >= TASK_SIZE:
            raise ImageError(f"mm field {name} {getattr(mm, name):#x} is beyond the user "
                             "address space", record="MM")
    if len(mm.auxv) > MAX_AUXV or len(mm.auxv) % 16:
        raise ImageError(f"auxv of {len(mm.auxv)} bytes", record="MM")
    if mm.vvar_start and (mm.vdso_size > 64 * PAGE or mm.vvar_start % PAGE):
        raise ImageError("bad vdso placement", record="MM")


def _check_shmem(v: image_pb2.Vma, where: str) -> None:
    shmem = v.flags & (sysnr.MAP_SHARED | sysnr.MAP_ANONYMOUS) == (sysnr.MAP_SHARED
                                                                   | sysnr.MAP_ANONYMOUS)
    if v.shmem_id and not shmem:
        raise ImageError(f"{where} names shared memory {v.shmem_id} but is not "
                         "MAP_SHARED|MAP_ANONYMOUS", record="MM")
    if not v.shmem_id:
        if v.shmem_size or (shmem and v.pgoff):
            raise ImageError(f"{where} has a shared memory size or offset but no object",
                             record="MM")
        return
    if not 0 < v.shmem_size <= TASK_SIZE or v.shmem_size % PAGE or v.pgoff >= v.shmem_size:
        raise ImageError(f"{where} is at offset {v.pgoff:#x} of shared memory "
                         f"{v.shmem_id} of {v.shmem_size:#x} bytes", record="MM")


def check_files_unchanged(mm: image_pb2.Mm) -> None:
    """Refuse when a mapped file or the executable is not the one dumped:
    pages we did not store would come from a different file."""
    checks = [(mm.exe, mm.exe_stat, "executable")] + [
        (v.path, v.stat, f"file mapped at {v.start:#x}") for v in mm.vmas
        if not v.flags & sysnr.MAP_ANONYMOUS]
    seen = set()
    for path, want, what in checks:
        if path in seen:
            continue
        seen.add(path)
        try:
            st = os.stat(path)
        except OSError as e:
            raise StateError(f"the {what} {path} is gone: {e.strerror}", path=path) from e
        if (st.st_ino, st.st_size, st.st_mtime_ns) != (want.ino, want.size, want.mtime_ns):
            raise StateError(f"the {what} {path} changed since the checkpoint (size "
                             f"{want.size} -> {st.st_size}, inode {want.ino} -> {st.st_ino})",
                             path=path)
    for v in mm.vmas:
        if not v.flags & sysnr.MAP_ANONYMOUS and v.pgoff >= max(v.stat.size, 1) + PAGE - 1:
            raise StateError(f"the mapping at {v.start:#x} starts beyond the end of {v.path}",
                             path=v.path)


def map_vmas(batch, mm: image_pb2.Mm, open_file, shmem=None) -> None:
    """Add to ``batch`` the mmap (and madvise) of every VMA. ``open_file(path,
    flags)`` adds an open and returns the fd it will have (one per file).
    ``shmem`` (a shared.TaskShmem) maps the VMAs of shared memory objects."""
    fds: dict[tuple[str, bool], object] = {}
    if shmem is not None:
        shmem.create(batch)
    for v in mm.vmas:
        fd: object = -1
        if v.shmem_id and shmem is not None:
            shmem.map(batch, v, open_file)
        else:
            if not v.flags & sysnr.MAP_ANONYMOUS:
                key = (v.path, v.file_writable)
                if key not in fds:
                    fds[key] = open_file(v.path, os.O_RDWR if v.file_writable else os.O_RDONLY)
                fd = fds[key]
            batch.call(sysnr.MMAP, v.start, v.end - v.start, v.prot,
                       v.flags | sysnr.MAP_FIXED, fd, v.pgoff,
                       what=f"mmap of {v.start:#x}-{v.end:#x} {v.name}")
        for advice in v.madvise:
            batch.call(sysnr.MADVISE, v.start, v.end - v.start, advice, may_fail=True,
                       what=f"madvise {advice} at {v.start:#x}")
        if v.locked:
            # May fail on RLIMIT_MEMLOCK: a lock is a hint of residency, not state.
            batch.call(sysnr.MLOCK, v.start, v.end - v.start, may_fail=True,
                       what=f"mlock at {v.start:#x}")
    if shmem is not None:
        shmem.finish(batch)


# Records smaller than this are written at once: handing a few pages to the
# writer thread costs more than writing them (~13 small records per process
# of a tree took ~1.6 ms; a thread is started only for the first big one).
ASYNC_FILL_MIN = 256 << 10


class PageFiller:
    """Writes page records into the task, checking each lies inside its VMA.

    A record's write runs on a thread while the caller reads and checksums
    the next one: pwrite and crc32 both release the GIL, so on two cores the
    two halves of the page phase overlap (1 GiB from a file: 1.04 s -> 0.54-0.77 s).
    So a record's data must stay valid until the next ``fill`` returns
    (``ImageReader.keep_pages(FILL_AHEAD + 1)``), and ``flush`` must be
    called to wait for the last write; ``close`` ends the thread.

    Pages of shared anonymous memory go through an fd on the object (its
    /proc/PID/map_files entry), at their offset in it: a read-only or
    PROT_NONE shared mapping cannot be written through /proc/PID/mem.
    """

    def __init__(self, memfd: int, pid: int, mm: image_pb2.Mm) -> None:
        self.memfd = memfd
        self.pid = pid
        self.vmas = {v.id: v for v in mm.vmas}
        self.bytes = 0
        self._pool = futures.ThreadPoolExecutor(max_workers=FILL_AHEAD,
                                                thread_name_prefix="ckptd-fill")
        self._pending: collections.deque[futures.Future] = collections.deque()
        self._objects: dict[int, int] = {}    # shmem id -> fd on the object

    def fill(self, rec: PageRecord) -> None:
        v = self.vmas.get(rec.vma_id)
        end = rec.vaddr + rec.data.nbytes
        if v is None or not v.start <= rec.vaddr <= end <= v.end:
            raise ImageError(f"page data {rec.vaddr:#x}-{end:#x} lies outside its VMA "
                             f"{rec.vma_id}", offset=rec.offset, record=f"#{rec.index} PAGES")
        if v.flags & sysnr.MAP_SHARED and not v.flags & sysnr.MAP_ANONYMOUS:
            raise ImageError("page data for a shared file mapping", offset=rec.offset,
                             record=f"#{rec.index} PAGES")
        fd, pos = self.memfd, rec.vaddr
        if v.shmem_id:
            pos = v.pgoff + rec.vaddr - v.start
            if pos + rec.data.nbytes > v.shmem_size:
                # A write there would grow the object, not fill it.
                raise ImageError(f"page data {rec.vaddr:#x}-{end:#x} lies beyond the end of "
                                 f"shared memory {v.shmem_id}", offset=rec.offset,
                                 record=f"#{rec.index} PAGES")
            fd = self._object_fd(v)
        self.bytes += rec.data.nbytes
        if rec.data.nbytes < ASYNC_FILL_MIN:
            self.flush()
            mem.pwrite_exact(fd, rec.data, pos, self.pid)
            return
        # The reader reuses the buffer of the record FILL_AHEAD + 1 back.
        while len(self._pending) >= FILL_AHEAD:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(mem.pwrite_exact, fd, rec.data, pos, self.pid))

    def _object_fd(self, v: image_pb2.Vma) -> int:
        fd = self._objects.get(v.shmem_id)
        if fd is None:
            with open(f"/proc/{self.pid}/maps") as f:
                for line in f:
                    lo, hi = (int(x, 16) for x in line.split(" ", 1)[0].split("-"))
                    if lo <= v.start < hi:
                        break
                else:
                    raise StateError(f"shared memory {v.shmem_id} is not mapped at "
                                     f"{v.start:#x} in pid {self.pid}", pid=self.pid)
            fd = os.open(f"/proc/{self.pid}/map_files/{lo:x}-{hi:x}", os.O_RDWR | os.O_CLOEXEC)
            self._objects[v.shmem_id] = fd
        return fd

    def flush(self) -> None:
        """Wait for the writes in flight; raises the first one's error."""
        first: BaseException | None = None
        while self._pending:
            try:
                self._pending.popleft().result()
            except BaseException as e:   # noqa: BLE001 - every write waited for, first error raised
                first = first or e
        if first is not None:
            raise first

    def close(self) -> None:
        """End the writer thread once its write is over; never raises (a
        failed write was reported by ``flush``, or is moot on abort)."""
        self._pool.shutdown(wait=True)
        self._pending.clear()
        for fd in self._objects.values():
            os.close(fd)
        self._objects.clear()


_MM_MAP = struct.Struct("<11QQII")   # struct prctl_mm_map, 104 bytes


def mm_map_struct(mm: image_pb2.Mm, auxv_addr: int, exe_fd: int) -> bytes:
    return _MM_MAP.pack(mm.start_code, mm.end_code, mm.start_data, mm.end_data,
                        mm.start_brk, mm.brk, mm.start_stack, mm.arg_start, mm.arg_end,
                        mm.env_start, mm.env_end, auxv_addr, len(mm.auxv), exe_fd)
