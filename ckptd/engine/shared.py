"""What processes of a tree share: anonymous MAP_SHARED memory (shmem
objects) and open file descriptions, restored as one object again; and how
much private memory is still one physical page in several processes.

Dump (``link`` once every process is collected; the tree is stopped):

* shmem objects: every MAP_SHARED|MAP_ANONYMOUS VMA carries the (st_dev,
  st_ino, st_size) of its /proc/PID/map_files entry (memory.py); VMAs with
  the same inode are one object and get one id and its size. Its contents
  are read once, through a map_files fd of it (SEEK_DATA/SEEK_HOLE says what
  exists, then big preads), so pages only another sharer touched are not
  missed. Each data range is stored against a VMA of the object that maps it
  (the first sharer's by preference); bytes no VMA maps are unreachable and
  dropped.
* open file descriptions: fds on one (dev, ino) in different processes are
  compared with kcmp KCMP_FILE; a description held by several processes gets
  an id; its first holder in tree order owns it (and a deleted file's
  contents), the others will take it from the owner.
* COW: of the private pages we store, those present and not exclusively
  mapped (pagemap); the same entry (same PFN) in an earlier process of the
  tree is a page stored twice. Reported, not deduplicated.

Restore (``Sharing``, built from the validated image): the first task (in
image order, parents first: the order tasks are built in) that maps an
object creates it: a plain MAP_SHARED|MAP_ANONYMOUS mmap when one of its
VMAs covers the whole object from offset 0, else a temporary mapping of the
whole object, unmapped at the end of the batch. Its other VMAs of the object
are mremap(old_size=0) copies of that anchor (for shared mappings the kernel
makes a second mapping of the same pages). A later task opens
/proc/<creator's pid>/map_files/<range> (its /proc is its PID namespace's,
so the pid is the image's) and maps it MAP_SHARED|MAP_FIXED at its own
address and offset. Pages are written through an fd on the object, at their
offset in it, so a read-only mapping is no obstacle. A shared description is
opened by its owner; each later holder takes it with pidfd_open +
pidfd_getfd (pids of one namespace) and dup3 to its number.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ckptd.engine import memory
from ckptd.errors import ImageError, StateError
from ckptd.kernel import sysnr
from ckptd.kernel import task as task_mod
from ckptd.v1 import image_pb2

log = structlog.get_logger(__name__)

PAGE = memory.PAGE
SEEK_DATA, SEEK_HOLE = 3, 4
MADV_POPULATE_READ = 22
# Where to look for room for a temporary whole-object mapping: above the
# usual mmap_min_addr/brk area, below the 47-bit end of user space.
TEMP_SEARCH_FROM = 1 << 32
# pagemap(5): bits 56-63 of an entry. A private page present, anonymous and
# not exclusively mapped has exactly PM_PRESENT set among them.
_SHARED_TOP = re.compile(rb"\x80+")


def is_shmem(v: image_pb2.Vma) -> bool:
    anon_shared = sysnr.MAP_SHARED | sysnr.MAP_ANONYMOUS
    return v.flags & anon_shared == anon_shared


# ---------------------------------------------------------------- dump

@dataclass(frozen=True)
class ObjectSpan:
    """Bytes [offset, offset + length) of a shmem object, stored as the page
    data of VMA ``vma_id`` at ``vaddr``; read through ``source``."""

    source: str
    offset: int
    length: int
    vaddr: int
    vma_id: int


@dataclass(frozen=True)
class Linked:
    """What ``link`` found: the object spans to store, counts for the log."""

    spans: list[ObjectSpan]
    objects: int
    descriptions: int

    @property
    def bytes(self) -> int:
        return sum(s.length for s in self.spans)


def link(collected: list[dict[str, Any]]) -> Linked:
    """Give shared objects and descriptions their ids in the collected
    messages (``pid``, ``mm``, ``files``, ``file_data`` of each process,
    tree order) and plan the object pages."""
    pids = [c["pid"] for c in collected]
    spans, objects = link_memory([(c["pid"], c["mm"]) for c in collected])
    descriptions = link_files(pids, [c["files"] for c in collected],
                              [c["file_data"] for c in collected])
    return Linked(spans, objects, descriptions)


def link_memory(procs: list[tuple[int, image_pb2.Mm]]) -> tuple[list[ObjectSpan], int]:
    objects: dict[tuple[int, int], list[tuple[int, image_pb2.Vma]]] = {}
    for pid, mm in procs:
        for v in mm.vmas:
            if is_shmem(v):
                objects.setdefault((v.stat.dev, v.stat.ino), []).append((pid, v))
    spans: list[ObjectSpan] = []
    for shmem_id, users in enumerate(objects.values(), 1):
        size = max(users[0][1].stat.size, PAGE)
        for _, v in users:
            v.shmem_id, v.shmem_size = shmem_id, size
        pid, first = users[0]
        source = f"/proc/{pid}/map_files/{first.start:x}-{first.end:x}"
        for lo, hi in _data_ranges(source, size):
            spans += _cover(source, lo, hi, [v for _, v in users])
        if len({p for p, _ in users}) > 1:
            log.debug("shmem_shared", shmem_id=shmem_id, size=size,
                      pids=sorted({p for p, _ in users}))
    return spans, len(objects)


def _data_ranges(source: str, size: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of the object that hold pages (in RAM or swap)."""
    out: list[tuple[int, int]] = []
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pos = 0
        while pos < size:
            try:
                lo = os.lseek(fd, pos, SEEK_DATA)
            except OSError as e:
                if e.errno == 6:     # ENXIO: no data after pos
                    break
                raise
            hi = min(os.lseek(fd, lo, SEEK_HOLE), size)
            if lo >= hi:
                break
            out.append((lo, hi))
            pos = hi
    finally:
        os.close(fd)
    return out


def _cover(source: str, lo: int, hi: int, vmas: list[image_pb2.Vma]) -> list[ObjectSpan]:
    """Split object bytes [lo, hi) among the VMAs mapping them, the first
    VMA that maps a byte taking it."""
    out = []
    todo = [(lo, hi)]
    for v in vmas:
        v_lo, v_hi = v.pgoff, v.pgoff + v.end - v.start
        left = []
        for a, b in todo:
            s, e = max(a, v_lo), min(b, v_hi)
            if s >= e:
                left.append((a, b))
                continue
            out.append(ObjectSpan(source, s, e - s, v.start + s - v_lo, v.id))
            if a < s:
                left.append((a, s))
            if e < b:
                left.append((e, b))
        todo = left
        if not todo:
            break
    return out


def write_object_pages(spans: list[ObjectSpan], writer,
                       progress: Callable[[int], None] | None = None) -> int:
    """Copy every object span into the image. Each object is mapped (read
    only, shared) into this process and the writer reads its pages in
    place: a pread of a shmem file copies at ~2 GB/s, which would double the
    cost. Only data ranges are touched, so no hole gets a page."""
    total = 0
    maps: dict[str, mmap.mmap] = {}
    try:
        for span in spans:
            m = maps.get(span.source)
            if m is None:
                fd = os.open(span.source, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    m = maps[span.source] = mmap.mmap(fd, os.fstat(fd).st_size,
                                                      mmap.MAP_SHARED, mmap.PROT_READ)
                finally:
                    os.close(fd)
            # One walk fills our page tables (faulting page by page from the
            # writer's two threads costs more than the copy it saves).
            try:
                m.madvise(MADV_POPULATE_READ, span.offset, span.length)
            except OSError as e:
                if e.errno != 22:     # EINVAL: a kernel before 5.14; faults do it
                    raise
            with memoryview(m) as view:
                done = 0
                while done < span.length:
                    n = min(memory.READ_SLICE, span.length - done)
                    at = span.offset + done
                    writer.write_pages(span.vaddr + done, view[at:at + n], span.vma_id)
                    done += n
                    total += n
                    if progress is not None:
                        progress(total)
    finally:
        for m in maps.values():
            m.close()
    return total


def link_files(pids: list[int], files: list[image_pb2.Files],
               data: list[list[image_pb2.FileData]]) -> int:
    """Mark descriptions held by several processes; the number of them."""
    classes: dict[tuple[int, int], list[list[tuple[int, int, image_pb2.Fd]]]] = {}
    for i, (pid, table) in enumerate(zip(pids, files)):
        for f in table.fds:
            if f.is_dup:
                continue
            groups = classes.setdefault((f.stat.dev, f.stat.ino), [])
            for g in groups:
                _, p0, f0 = g[0]
                if p0 != pid and task_mod.same_file_across(p0, f0.fd, pid, f.fd):
                    g.append((i, pid, f))
                    break
            else:
                groups.append([(i, pid, f)])
    n = 0
    for groups in classes.values():
        for g in groups:
            if len(g) < 2:
                continue
            n += 1
            for k, (i, pid, f) in enumerate(g):
                f.shared_id, f.shared_owner = n, k == 0
                if k and f.deleted:
                    # The owner stores the contents; the others take its description.
                    data[i][:] = [d for d in data[i] if d.fd != f.fd]
            log.debug("description_shared", shared_id=n, path=g[0][2].path,
                      holders=[(pid, f.fd) for _, pid, f in g])
    return n


def cow_keys(pid: int, spans) -> set[int]:
    """pagemap entries of the pages in ``spans`` (private pages we store)
    that are present, anonymous and mapped more than once: equal entries in
    two processes are one physical page. Only runs of such entries become
    Python ints: a process that wrote its pages costs one bytes slice."""
    keys: set[int] = set()
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        for s in spans:
            raw = os.pread(f.fileno(), (s.end - s.start) // PAGE * 8, s.start // PAGE * 8)
            for m in _SHARED_TOP.finditer(raw[7::8]):
                a, b = m.span()
                keys.update(memoryview(raw)[a * 8:b * 8].cast("Q"))
    return keys


def count_cow_shared(keysets: list[set[int]]) -> int:
    """Bytes stored again although an earlier process of the tree maps the
    very same physical page."""
    seen: set[int] = set()
    dup = 0
    for keys in keysets:
        dup += len(keys & seen)
        seen |= keys
    return dup * PAGE


# ---------------------------------------------------------------- restore

class Sharing:
    """Who makes each shared object of a restore, and what they made."""

    def __init__(self, procs: list[tuple[int, image_pb2.Mm, image_pb2.Files]]) -> None:
        self.creator: dict[int, int] = {}              # shmem id -> pid of its creator
        self.first_vma: dict[int, image_pb2.Vma] = {}  # shmem id -> creator's first VMA of it
        self.made: dict[int, str] = {}                 # shmem id -> map_files path, once made
        self.owner: dict[int, tuple[int, int]] = {}    # description id -> (pid, fd)
        for pid, mm, files in procs:
            for v in mm.vmas:
                if v.shmem_id and v.shmem_id not in self.creator:
                    self.creator[v.shmem_id] = pid
                    self.first_vma[v.shmem_id] = v
            for f in files.fds:
                if f.shared_owner:
                    self.owner[f.shared_id] = (pid, f.fd)

    def created(self, pid: int, host_pid: int) -> None:
        """After ``pid``'s layout batch: note where its objects are, for the
        later sharers (the kernel may have merged a VMA with a neighbour)."""
        mine = [sid for sid, p in self.creator.items() if p == pid]
        if not mine:
            return
        ranges = _ranges(host_pid)
        for sid in mine:
            at = self.first_vma[sid].start
            hit = next(((s, e) for s, e in ranges if s <= at < e), None)
            if hit is None:
                raise StateError(f"pid {pid} made shared memory {sid} at {at:#x} but it is "
                                 "not mapped there", pid=pid)
            self.made[sid] = f"/proc/{pid}/map_files/{hit[0]:x}-{hit[1]:x}"

    def object_path(self, sid: int) -> str:
        return self.made[sid]

    def take_from(self, shared_id: int) -> tuple[int, int]:
        return self.owner[shared_id]


def _ranges(host_pid: int) -> list[tuple[int, int]]:
    out = []
    with open(f"/proc/{host_pid}/maps") as f:
        for line in f:
            s, _, e = line.split(" ", 1)[0].partition("-")
            out.append((int(s, 16), int(e, 16)))
    return out


def check_image(procs: list[tuple[int, image_pb2.Mm, image_pb2.Files]]) -> None:
    """What a shared object or description claims across tasks (each task's
    own records are checked by memory.check_mm and files.check_files)."""
    sizes: dict[int, int] = {}
    for pid, mm, _ in procs:
        for v in mm.vmas:
            if v.shmem_id and sizes.setdefault(v.shmem_id, v.shmem_size) != v.shmem_size:
                raise ImageError(f"task {pid}: VMA {v.start:#x}-{v.end:#x} gives shared "
                                 f"memory {v.shmem_id} {v.shmem_size} bytes, another VMA "
                                 f"{sizes[v.shmem_id]}", record="MM")
    owners: dict[int, int] = {}
    for pid, _, files in procs:
        for f in files.fds:
            if not f.shared_id:
                continue
            if f.shared_owner:
                if f.shared_id in owners:
                    raise ImageError(f"shared file description {f.shared_id} has two owners "
                                     f"(tasks {owners[f.shared_id]} and {pid})", record="FILES")
                owners[f.shared_id] = pid
            elif f.shared_id not in owners:
                raise ImageError(f"task {pid} fd {f.fd} shares file description "
                                 f"{f.shared_id}, which no earlier task opens", record="FILES")


class TaskShmem:
    """The shmem VMAs of one task being laid out, in its layout batch."""

    def __init__(self, sharing: Sharing, pid: int, mm: image_pb2.Mm,
                 busy: list[tuple[int, int]]) -> None:
        self.sharing = sharing
        self.pid = pid
        self.mm = mm
        self.busy = sorted(busy + [(v.start, v.end) for v in mm.vmas])
        self.anchor: dict[int, int] = {}    # shmem id -> where its offset 0 is mapped here
        self.done: set[int] = set()         # VMA ids already mapped (an anchor)
        self.temps: list[tuple[int, int]] = []
        self.fds: dict[int, Any] = {}

    def create(self, batch) -> None:
        """Make the objects this task creates, before any VMA is mapped."""
        for sid, creator in self.sharing.creator.items():
            if creator != self.pid:
                continue
            vmas = [v for v in self.mm.vmas if v.shmem_id == sid]
            size = vmas[0].shmem_size
            full = next((v for v in vmas if v.pgoff == 0 and v.end - v.start == size), None)
            if full is not None:
                batch.call(sysnr.MMAP, full.start, size, full.prot,
                           full.flags | sysnr.MAP_FIXED, -1, 0,
                           what=f"mmap of shared memory at {full.start:#x}")
                self.anchor[sid] = full.start
                self.done.add(full.id)
                continue
            addr = self._room(size)
            batch.call(sysnr.MMAP, addr, size, sysnr.PROT_READ | sysnr.PROT_WRITE,
                       sysnr.MAP_SHARED | sysnr.MAP_ANONYMOUS | sysnr.MAP_FIXED_NOREPLACE,
                       -1, 0, what=f"mmap of shared memory {sid} ({size} bytes) at {addr:#x}")
            self.anchor[sid] = addr
            self.temps.append((addr, addr + size))

    def map(self, batch, v: image_pb2.Vma, open_file: Callable[[str, int], Any]) -> None:
        if v.id in self.done:
            return
        size = v.end - v.start
        where = f"shared memory {v.shmem_id} at {v.start:#x}"
        if v.shmem_id in self.anchor:
            batch.call(sysnr.MREMAP, self.anchor[v.shmem_id] + v.pgoff, 0, size,
                       sysnr.MREMAP_MAYMOVE | sysnr.MREMAP_FIXED, v.start, what=f"mremap of {where}")
            batch.call(sysnr.MPROTECT, v.start, size, v.prot, what=f"mprotect of {where}")
            return
        fd = self.fds.get(v.shmem_id)
        if fd is None:
            fd = self.fds[v.shmem_id] = open_file(self.sharing.object_path(v.shmem_id),
                                                  os.O_RDWR)
        batch.call(sysnr.MMAP, v.start, size, v.prot,
                   sysnr.MAP_SHARED | sysnr.MAP_FIXED | (v.flags & sysnr.MAP_NORESERVE),
                   fd, v.pgoff, what=f"mmap of {where}")

    def finish(self, batch) -> None:
        for lo, hi in self.temps:
            batch.call(sysnr.MUNMAP, lo, hi - lo, what=f"unmap temporary shared memory {lo:#x}")

    def _room(self, size: int) -> int:
        addr = TEMP_SEARCH_FROM
        for lo, hi in sorted(self.busy + self.temps):
            if addr + size <= lo:
                break
            addr = max(addr, -(-hi // PAGE) * PAGE)
        if addr + size > memory.TASK_SIZE:
            raise StateError(f"no room in pid {self.pid} for shared memory of {size} bytes")
        return addr


def take_fd(batch, table, f: image_pb2.Fd, owner: tuple[int, int]) -> None:
    """Add to ``batch`` the calls that install the owner's description at
    ``f.fd``: pidfd_open + pidfd_getfd (whose fd is close-on-exec), then
    dup3 to the number (or fix the flag if it landed there), close the rest."""
    pid, fd = owner
    what = f"fd {f.fd} from pid {pid} fd {fd}"
    pidfd = table.lowest_free()
    batch.call(sysnr.PIDFD_OPEN, pid, 0, what=f"pidfd_open({pid}) to take {what}")
    table.used.add(pidfd)
    got = table.lowest_free()
    batch.call(sysnr.PIDFD_GETFD, pidfd, fd, 0, what=f"pidfd_getfd of {what}")
    table.used.add(got)
    table.close(batch, pidfd)
    cloexec = f.flags & os.O_CLOEXEC
    if got == f.fd:
        batch.call(sysnr.FCNTL, got, sysnr.F_SETFD, sysnr.FD_CLOEXEC if cloexec else 0,
                   what=f"close-on-exec of {what}")
        return
    batch.call(sysnr.DUP3, got, f.fd, cloexec, what=f"dup3 of {what}")
    table.used.add(f.fd)
    table.close(batch, got)
