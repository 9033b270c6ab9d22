"""Restore orchestration: read and validate -> create the stub -> lay out ->
fill pages -> finish the task -> registers -> detach.

The order is the one ENGINE-NOTES.md established: a freestanding stub with
the original pid, held under ptrace (EXITKILL), gets a trampoline with the
batch runner, loses its own mappings, gets the image's vdso placement, fds
and VMAs in one batch, its pages through /proc/PID/mem. Then the leader
clones the other threads with their tids (threads.py: one batch, each new
thread stopped at birth), runs one batch for the mm fields, signals, timers,
limits, identity, and its own credentials and seccomp (last); each other
thread runs its own batch of per-thread state, credentials and seccomp last.
Finally every thread gets its registers, and the threads are detached before
the leader. Any failure kills what was built.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from ckptd import native
from ckptd.engine import (files, identity, locks, memory, regs, rlimits, shared,
                          sharing_tables, signals, sigtrap, threads, timers, tree)
from ckptd.engine.inject import DATA_AT, DATA_END, STACK_TOP, TRAMPOLINE_SIZE, Batch, Tracee
from ckptd.errors import BugError, ImageError, StateError, SystemError_, UnsupportedError
from ckptd.image import ImageReader, MessageRecord, PageRecord
from ckptd.image.registry import RecordType
from ckptd.kernel import procfs, proctask, ptrace, sysnr, task as task_mod
from ckptd.v1 import image_pb2

log = structlog.get_logger(__name__)

PID_MAX = 1 << 22             # PID_MAX_LIMIT on 64-bit
# How long to wait for the dumped process's pid to disappear (PID 1 here
# reaps orphans only about once a second, MACHINE.md).
PID_FREE_TIMEOUT = 5.0
# Killed tasks exit at once; this only bounds a kernel that does not let them.
KILL_TIMEOUT = 10.0
TRAMPOLINE_SEARCH_FROM = 1 << 20
TRAMPOLINE_ALIGN = 1 << 20

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Restored:
    pid: int            # host pid
    ns_pid: int
    restore_ms: float


@dataclass
class Metadata:
    origin: image_pb2.Origin
    task: image_pb2.Task
    mm: image_pb2.Mm
    files: image_pb2.Files
    file_data: dict[int, bytes]


def read_metadata(reader: ImageReader) -> tuple[Metadata, Iterator, PageRecord | None]:
    """The root process's metadata (see ``read_tree``)."""
    procs, records, first = read_tree(reader)
    return procs[0], records, first


def read_tree(reader: ImageReader) -> tuple[list[Metadata], Iterator, PageRecord | None]:
    """Header and metadata records, validated: one Metadata per process,
    parents first; the record iterator and the first page record (or None
    if the image had none and is fully verified)."""
    header = reader.read_header()
    if header.arch != os.uname().machine or header.page_size != memory.PAGE:
        raise ImageError(f"image is for {header.arch} with {header.page_size}-byte pages; "
                         f"this machine is {os.uname().machine}/{memory.PAGE}", record="HEADER")
    origin: image_pb2.Origin | None = None
    groups: list[dict[int, Any]] = []
    data: list[dict[int, bytes]] = []
    records = iter(reader)
    first_page: PageRecord | None = None
    for rec in records:
        if isinstance(rec, PageRecord):
            first_page = rec
            break
        assert isinstance(rec, MessageRecord)
        if rec.type == RecordType.RECORD_TYPE_ORIGIN:
            if origin is not None or groups:
                raise ImageError("a second or late ORIGIN record", offset=rec.offset,
                                 record=rec.name)
            origin = rec.message
            continue
        if rec.type == RecordType.RECORD_TYPE_TASK:
            groups.append({})
            data.append({})
        elif not groups:
            raise ImageError(f"a {rec.name} record before any TASK", offset=rec.offset,
                             record=rec.name)
        if rec.type == RecordType.RECORD_TYPE_FILE_DATA:
            data[-1][rec.message.fd] = rec.message.data
        elif rec.type in groups[-1]:
            raise ImageError(f"a second {rec.name} record for one task", offset=rec.offset,
                             record=rec.name)
        else:
            groups[-1][rec.type] = rec.message
    if origin is None:
        raise ImageError("no ORIGIN record before the page data", record="ORIGIN")
    if not groups:
        raise ImageError("no TASK record before the page data", record="TASK")
    need = {RecordType.RECORD_TYPE_MM: "MM", RecordType.RECORD_TYPE_FILES: "FILES"}
    procs: list[Metadata] = []
    zombies: list[Metadata] = []
    for found, fdata in zip(groups, data):
        task = found[RecordType.RECORD_TYPE_TASK]
        if task.zombie:
            if len(found) > 1 or fdata:
                raise ImageError(f"zombie {task.pid} with an address space or files",
                                 record="TASK")
            zombies.append(Metadata(origin, task, image_pb2.Mm(), image_pb2.Files(), {}))
            continue
        for t, name in need.items():
            if t not in found:
                raise ImageError(f"no {name} record before the page data", record=name)
        procs.append(Metadata(origin, task, found[RecordType.RECORD_TYPE_MM],
                              found[RecordType.RECORD_TYPE_FILES], fdata))
    if groups[0][RecordType.RECORD_TYPE_TASK].zombie:
        raise ImageError("the root task is a zombie", record="TASK")
    tree.check_tree([m.task for m in procs + zombies])
    sharing_tables.check_sharing([m.task for m in procs + zombies],
                                 {m.task.pid: (len(m.files.fds), len(m.mm.vmas)) for m in procs})
    ids: set[int] = set()
    for m in procs:
        validate(m)
        mine = {v.id for v in m.mm.vmas}
        if ids & mine:
            raise ImageError(f"task {m.task.pid} reuses VMA ids of another task", record="MM")
        ids |= mine
    return procs + zombies, records, first_page


def validate(meta: Metadata) -> None:
    t = meta.task
    if not 1 <= t.pid < PID_MAX:
        raise ImageError(f"task pid {t.pid}", record="TASK")
    threads.check_threads(t)
    signals.check_signals(t)
    memory.check_mm(meta.mm)
    files.check_files(meta.files, meta.file_data)
    if meta.mm.vdso_start:
        mine = memory.vdso_fingerprint()
        if meta.origin.vdso_fingerprint != mine:
            raise ImageError("the image was taken on a different kernel (vdso "
                             f"{meta.origin.vdso_fingerprint[:12] or 'unknown'} != "
                             f"{mine[:12]}): restore needs the same kernel", record="ORIGIN")


def need_message(meta: Metadata) -> dict[str, Any]:
    o = meta.origin
    return {"source": {"kind": o.kind, "container_id": o.container_id,
                       "container_name": o.container_name, "hostname": o.hostname,
                       "network": o.network, "log_path": o.log_path},
            "pid": meta.task.pid, "hostname": o.hostname, "domainname": o.domainname,
            "network": o.network}


class RestoreSession:
    """Builds one task from validated metadata; ``abort`` kills what it made."""

    def __init__(self, meta: Metadata, *, target: str = "host") -> None:
        self.meta = meta
        self.target = target
        self.pid = 0
        self.our_child = False
        self.tracee: Tracee | None = None
        self.temp_files: dict[int, str] = {}
        self.filler: memory.PageFiller | None = None
        self.own_affinity = os.sched_getaffinity(0)
        self.started = time.monotonic()
        self.base: ptrace.Regs | None = None
        self.table = files.FdTable()
        self.tids: list[int] = []     # host tids of the threads made so far, leader first
        self.gadget = 0
        self.tree_pids: set[int] = set()
        self.helpers: set[int] = set()     # pids of groups whose leader has exited
        self.helper_tids: list[int] = []   # host pids of our helpers still alive
        # (the root's group if outside the tree, 0 if not; the root's session)
        self.outside_group: tuple[int, RestoreSession | None] = (0, None)
        # Shared with other processes (sharing_tables.py): the session of the
        # first sharer of the fd table / address space; whether this is the
        # last fs / address-space sharer (chroot / trampoline unmap are last).
        self.fds_from: RestoreSession = self
        self.vm_from: RestoreSession = self
        self.fs_last = True
        self.vm_last = True

    # -- the stub --
    def relocate_log(self, new_path: str) -> None:
        """A container's stdout/stderr log is daemon-owned and per container:
        fds on the old container's log go to the new container's log, at its end."""
        old = self.meta.origin.log_path
        if not old or not new_path or old == new_path:
            return
        size = os.stat(new_path).st_size if os.path.exists(new_path) else 0
        for f in self.meta.files.fds:
            if f.path == old and not f.deleted and not f.is_dup:
                f.path = new_path
                f.pos = size
                log.debug("log_relocated", fd=f.fd, path=new_path)

    def create_task(self, stub_pid: int | None) -> None:
        memory.check_files_unchanged(self.meta.mm)
        files.check_paths(self.meta.files)
        if stub_pid is None:
            self.pid = self._spawn_host(self.meta.task.pid)
            self.our_child = True
        else:
            self.pid = stub_pid
        self.tids = [self.pid]
        try:
            ptrace.seize(self.pid, ptrace.PTRACE_O_EXITKILL | ptrace.PTRACE_O_TRACESYSGOOD)
            # A stub that is PID 1 of a new namespace cannot stop itself (init
            # ignores its own SIGSTOP): it waits in pause() instead. Interrupt
            # either way; an extra trap later is harmless (resumed through).
            ptrace.interrupt(self.pid)
        except OSError as e:
            raise SystemError_(f"cannot seize the stub {self.pid}: {e.strerror}",
                               pid=self.pid) from e
        while True:
            stop = ptrace.wait_stop(self.pid)
            if stop.exited:
                raise SystemError_(f"the stub {self.pid} {stop.describe()}", pid=self.pid)
            if stop.event == ptrace.PTRACE_EVENT_STOP:
                break
            ptrace.cont(self.pid, stop.sig)
        # The stub stopped itself with SIGSTOP: without a SIGCONT its group
        # stop would take over again at detach. Sent now, while its SIGCONT
        # action is the default and nothing is blocked, it is discarded.
        os.kill(self.pid, signal.SIGCONT)
        cpu = _cpu_of(self.pid)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
            os.sched_setaffinity(self.pid, {cpu})
        ptrace.set_sigmask(self.pid, (1 << 64) - 1)   # nothing delivered while we work
        self.tracee = Tracee(self.pid)
        self.base = ptrace.get_regs(self.pid)

    def _spawn_host(self, pid: int) -> int:
        """The root's stub with its pid (restore() waited for every pid of
        the tree to be free)."""
        try:
            child = task_mod.spawn_with_pid(pid, str(native.binary(native.STUB)),
                                            [native.STUB])
        except OSError as e:
            raise StateError(f"cannot create a process with pid {pid}: {e.strerror}",
                             pid=pid) from e
        _, status = os.waitpid(child, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            raise SystemError_(f"the stub {child} did not stop (status {status:#x})", pid=child)
        return child

    def adopt(self, pid: int, parent: RestoreSession) -> None:
        """Take over a child its parent cloned (stopped at birth, traced): a
        copy of the parent's stub, trampoline included."""
        self.pid = pid
        self.tids = [pid]
        threads.wait_born(pid)
        self.tracee = Tracee(pid)
        self.base = parent.base

    # -- the tree --
    def map_trampoline(self) -> None:
        assert self.tracee is not None and self.base is not None
        if self.vm_from is not self:
            # Cloned with CLONE_VM: the trampoline is already in its memory.
            owner = self.vm_from.tracee
            assert owner is not None
            self.tracee.tramp, self.tracee.runner = owner.tramp, owner.runner
            self.tracee.runner_end = owner.runner_end
            self.gadget = self.vm_from.gadget
            return
        stub_vmas = proctask.parse_smaps(open(f"/proc/{self.pid}/maps").read())
        code, runner_off = native.stub_blob()
        self.gadget = gadget = self._stub_gadget(stub_vmas)
        tramp = _free_range(stub_vmas, self.meta.mm)
        got = self.tracee.syscall(gadget, sysnr.MMAP, tramp, TRAMPOLINE_SIZE, 7,
                                  sysnr.MAP_PRIVATE | sysnr.MAP_ANONYMOUS
                                  | sysnr.MAP_FIXED_NOREPLACE, -1, 0, base=self.base)
        if got != tramp:
            raise SystemError_(f"cannot map the trampoline at {tramp:#x}: result {got}",
                               pid=self.pid)
        self.tracee.install_trampoline(tramp, code, runner_off)

    def lead(self) -> None:
        """Take the lead of its own session or group before making children,
        who inherit both (a session can be entered only at birth)."""
        assert self.tracee is not None and self.base is not None
        task = self.meta.task
        b = Batch(self.tracee.tramp + DATA_AT)
        sid, pgid = _ns_ids(self.pid)
        if task.session_leader and sid != task.pid:
            b.call(sysnr.SETSID, what="setsid")
        elif task.group_leader and pgid != task.pid:
            b.call(sysnr.SETPGID, 0, 0, what="setpgid")
        if task.child_subreaper:
            # Now, not with the other attributes: orphans of helpers that exit
            # while the tree is made must come to this task.
            b.call(sysnr.PRCTL, sysnr.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0, what="subreaper")
        self.tracee.run_batch(b, self.base)

    def join_group(self) -> None:
        """Enter its process group, made by its leader (or a helper standing
        in for one that has exited) before any member was cloned. Members of
        the root's group when that lies outside the tree (a host tree started
        from a shell) join the group the root is in now."""
        assert self.tracee is not None and self.base is not None
        task = self.meta.task
        want = task.pgid
        outside, root = self.outside_group
        if want and want == outside and root is not None and root is not self:
            want = _ns_ids(root.pid)[1]       # where the root is now
        elif want not in self.tree_pids | self.helpers:
            return
        _, pgid = _ns_ids(self.pid)
        if want and pgid != want:
            b = Batch(self.tracee.tramp + DATA_AT)
            b.call(sysnr.SETPGID, 0, want, what=f"join process group {want}")
            self.tracee.run_batch(b, self.base)

    def clone_children(self, children: list[image_pb2.Task],
                       flags: dict[int, int] | None = None) -> list[int]:
        """clone3 each child with its pid, in one batch of this (still stub)
        task; traced from birth (TRACEFORK/TRACECLONE), each stops before it
        runs anything. ``flags``: pid -> what it shares with this task
        (CLONE_PARENT: a sibling, this task's parent's child). Returns their
        host pids, in order."""
        assert self.tracee is not None and self.base is not None
        if not children:
            return []
        flags = flags or {}
        plain = ptrace.PTRACE_O_EXITKILL | ptrace.PTRACE_O_TRACESYSGOOD
        ptrace.set_options(self.pid, plain | ptrace.PTRACE_O_TRACEFORK
                           | ptrace.PTRACE_O_TRACECLONE)
        b = Batch(self.tracee.tramp + DATA_AT)
        threads.clone_children(b, children, flags)
        try:
            made = self.tracee.run_batch(b, self.base)
        except OSError as e:
            taken = [c.pid for c in children if c.pid not in _child_ns_pids(self.pid)]
            raise StateError(f"cannot create child {taken[:1] or '?'} of pid "
                             f"{self.meta.task.pid} with its pid: {e.strerror} (is the pid "
                             "taken?)", pid=taken[0] if taken else self.pid) from e
        finally:
            ptrace.set_options(self.pid, plain)
        host = _child_ns_pids(self.pid)
        if any(f & sharing_tables.CLONE_PARENT for f in flags.values()):
            host.update(_child_ns_pids(int(procfs.read_status(self.pid)["PPid"])))
        if made != [c.pid for c in children]:
            raise SystemError_(f"children were made with pids {made}, not the image's",
                               pid=self.pid)
        return [host[c.pid] for c in children]

    def lead_group_for(self, host: int, pgid: int) -> None:
        """A helper this task cloned (a copy of it, trampoline included)
        makes group ``pgid`` in this task's session."""
        assert self.tracee is not None and self.base is not None
        threads.wait_born(host)
        self.helper_tids.append(host)
        helper = Tracee(host)
        try:
            helper.install_trampoline(self.tracee.tramp, *native.stub_blob())
            b = Batch(self.tracee.tramp + DATA_AT)
            b.call(sysnr.SETPGID, 0, 0, what=f"make process group {pgid}")
            helper.run_batch(b, self.base)
        finally:
            helper.close()

    def end_helper(self, pid: int, host: int) -> None:
        """The helper exits; we collect it as its tracer, this task reaps it."""
        assert self.tracee is not None and self.base is not None
        ptrace.set_regs(host, self.base.with_(rip=self.tracee.tramp, rax=sysnr.EXIT_GROUP,
                                              orig_rax=-1, rdi=0))
        ptrace.cont(host)
        while not ptrace.wait_stop(host).exited:
            ptrace.cont(host)
        b = Batch(self.tracee.tramp + DATA_AT)
        b.call(sysnr.WAIT4, pid, 0, 0x40000000, 0, what=f"reap the helper {pid}")  # __WALL
        self.tracee.run_batch(b, self.base)
        self.helper_tids.remove(host)

    def reap_later(self, zombie: RestoreSession) -> None:
        """``zombie`` (this task's child, a stub copy) dies as it had died,
        with the same wait status, and is left for this task to reap. The
        signal it sends this task (blocked while we work) is taken back: the
        original was delivered long ago."""
        assert self.tracee is not None and self.base is not None
        assert zombie.tracee is not None
        host, status = zombie.pid, zombie.meta.task.wait_status
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig != signal.SIGKILL:
                b = Batch(self.tracee.tramp + DATA_AT)
                b.call(sysnr.RT_SIGACTION, sig, b.put(bytes(32), 8), 0, 8,
                       what=f"default action for signal {sig}")
                zombie.tracee.run_batch(b, self.base)
                ptrace.set_sigmask(host, 0)
            os.kill(host, sig)
        else:
            ptrace.set_regs(host, self.base.with_(rip=self.tracee.tramp, rax=sysnr.EXIT_GROUP,
                                                  orig_rax=-1, rdi=os.WEXITSTATUS(status)))
        ptrace.cont(host)
        while not (stop := ptrace.wait_stop(host)).exited:
            ptrace.cont(host, stop.sig if stop.event == 0 else 0)
        zombie.tracee.close()
        zombie.tracee = None
        zombie.pid = 0    # dead; this task reaps it when it will
        if zombie.meta.task.exit_signal:
            b = Batch(self.tracee.tramp + DATA_AT)
            sigset = struct.pack("<Q", 1 << (zombie.meta.task.exit_signal - 1))
            b.call(sysnr.RT_SIGTIMEDWAIT, b.put(sigset, 8), 0, b.put(bytes(16), 8), 8,
                   may_fail=True, what="take back the exit signal of a zombie")
            self.tracee.run_batch(b, self.base)

    # -- the address space --
    def build(self, sharing: shared.Sharing | None = None) -> None:
        """Lay out fds and memory. With ``sharing``, objects shared with tasks
        built before this one are taken from them, and those this one makes
        are noted for the tasks built after it."""
        assert self.tracee is not None and self.base is not None
        mm = self.meta.mm
        stub_vmas = proctask.parse_smaps(open(f"/proc/{self.pid}/maps").read())
        tramp = self.tracee.tramp
        own_fds = self.fds_from is self     # else the first sharer's fds are ours
        if own_fds:
            self.temp_files = files.prepare_deleted(self.meta.files, self.meta.file_data)
        b = Batch(tramp + DATA_AT)
        if own_fds:
            b.call(sysnr.CLOSE_RANGE, 0, 0xFFFFFFFF, 0, what="close the stub's fds")
        if self.vm_from is not self:
            self._build_fds_only(b, own_fds, sharing)    # the memory is the first sharer's
            return
        vdso_group = [v for v in stub_vmas if v.path in memory.VDSO_NAMES]
        keep_vdso = bool(vdso_group) and mm.vvar_start == vdso_group[0].start
        for v in stub_vmas:
            if v.start >= memory.TASK_SIZE or v.start == tramp:
                continue
            if v.path in memory.VDSO_NAMES and keep_vdso:
                continue
            b.call(sysnr.MUNMAP, v.start, v.end - v.start, what=f"unmap stub {v.path}")
        if mm.vvar_start and not keep_vdso:
            b.call(sysnr.ARCH_PRCTL, sysnr.ARCH_MAP_VDSO_64, mm.vvar_start,
                   what=f"map the vdso at {mm.vvar_start:#x}")
        table = self.table
        if own_fds:
            files.restore_files(b, self.meta.files, table, self.temp_files, sharing)
        map_fds: list[int] = []

        def open_file(path: str, flags: int) -> int:
            fd = table.open(b, b.cstr(path), flags | os.O_CLOEXEC, f"open {path} to map it")
            map_fds.append(fd)
            return fd

        shmem = None
        if sharing is not None:
            busy = [(v.start, v.end) for v in stub_vmas if v.start < memory.TASK_SIZE]
            busy.append((tramp, tramp + TRAMPOLINE_SIZE))
            if mm.vvar_start:
                busy.append((mm.vvar_start, mm.vvar_start + mm.vdso_size))
            shmem = shared.TaskShmem(sharing, self.meta.task.pid, mm, busy)
        memory.map_vmas(b, mm, open_file, shmem)
        for fd in map_fds:
            table.close(b, fd)
        self.tracee.run_batch(b, self.base)
        files.unlink_all(self.temp_files)
        if sharing is not None:
            sharing.created(self.meta.task.pid, self.pid)
        self.filler = memory.PageFiller(self.tracee.memfd, self.pid, mm)
        log.debug("layout_restored", pid=self.pid, vmas=len(mm.vmas),
                  fds=len(self.meta.files.fds))

    def _build_fds_only(self, b: Batch, own_fds: bool,
                        sharing: shared.Sharing | None = None) -> None:
        """A process sharing another's address space: only its fd table."""
        assert self.tracee is not None and self.base is not None
        if own_fds:
            files.restore_files(b, self.meta.files, self.table, self.temp_files, sharing)
        self.tracee.run_batch(b, self.base)
        files.unlink_all(self.temp_files)
        log.debug("fds_restored", pid=self.pid, fds=len(self.meta.files.fds),
                  memory_of=self.meta.task.vm_of)

    def _stub_gadget(self, vmas: list[proctask.SmapsVma]) -> int:
        # By inode: in a container the path may read differently.
        ino = os.stat(native.binary(native.STUB)).st_ino
        starts = [v.start for v in vmas if v.inode == ino and v.offset == 0]
        if not starts:
            raise SystemError_(f"pid {self.pid} is not running the ckptd stub", pid=self.pid)
        sym, _ = native.symbols(native.binary(native.STUB))["ckptd_blob"]
        gadget = starts[0] + sym
        assert self.tracee is not None
        if self.tracee.read(gadget, 3) != b"\x0f\x05\xcc":
            raise BugError(f"no syscall gadget at {gadget:#x} in the stub")
        return gadget

    # -- pages --
    @contextlib.contextmanager
    def unpinned(self) -> Iterator[None]:
        """Run on every CPU we may while pages are filled: that needs no ptrace
        round trips, and pinned next to the task, the page writer thread
        (started by the first fill, inheriting our CPUs) and the reading and
        checksumming would share one core."""
        pinned = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.own_affinity)
        try:
            yield
        finally:
            os.sched_setaffinity(0, pinned)

    def fill(self, rec: PageRecord) -> None:
        assert self.filler is not None
        self.filler.fill(rec)

    def pages_filled(self) -> None:
        """Wait for the last page write (raising its error), end the writer."""
        if self.filler is None:
            return    # shares the address space filled through its first sharer
        try:
            self.filler.flush()
        finally:
            self.filler.close()

    # -- the rest --
    def finish(self) -> Restored:
        assert self.tracee is not None and self.base is not None
        meta, task, th = self.meta, self.meta.task, self.meta.task.threads[0]
        # Syscalls run inside the task name it by its pid in its own namespace.
        inside = _ns_pid(self.pid)
        self._create_threads(inside)
        b = Batch(self.tracee.tramp + DATA_AT)
        table = self.table
        if self.vm_from is self:
            exe_fd = table.open(b, b.cstr(meta.mm.exe), os.O_RDONLY | os.O_CLOEXEC,
                                f"open the executable {meta.mm.exe}")
            auxv = b.put(meta.mm.auxv, 8)
            mm_map = b.put(memory.mm_map_struct(meta.mm, auxv, exe_fd), 8)
            b.call(sysnr.PRCTL, sysnr.PR_SET_MM, sysnr.PR_SET_MM_MAP, mm_map, 104, 0,
                   what="PR_SET_MM_MAP")
            table.close(b, exe_fd)
        if self.fs_last:     # shared: once, by the last sharer (sharing_tables.py)
            files.restore_fs(b, meta.files)
        locks.restore_posix(b, meta.files)     # no fd of the task is closed after this
        signals.restore_sigactions(b, task)
        timers.restore_itimers(b, task)
        timers.restore_posix_timers(b, task, inside)
        rlimits.restore_rlimits(b, task, proctask.read_limits(self.pid))
        identity.restore_task_attrs(b, task, pdeathsig=not self.our_child)
        signals.restore_shared_pending(b, task, inside)
        cur_bnd = int(procfs.read_status(self.pid)["CapBnd"], 16)
        threads.restore_thread(b, task, th, inside, inside, cur_bnd)
        self.tracee.run_batch(b, self.base)
        for other, tid in zip(task.threads[1:], self.tids[1:]):
            b = Batch(self.tracee.tramp + DATA_AT)
            threads.restore_thread(b, task, other, inside, other.tid, cur_bnd)
            self.tracee.thread(tid).run_batch(b, self.base)
        if self.vm_last:     # shared memory: the others still need it
            self._unmap_trampoline()
        for t, tid in zip(task.threads, self.tids):
            ptrace.set_regs(tid, regs.restart_fixup(ptrace.Regs.unpack(t.regs)))
            ptrace.set_xstate(tid, regs.settable_xstate(t.xstate))
            ptrace.set_sigmask(tid, t.sigmask)
            cpus = {c for c in range(64) if t.cpu_affinity >> c & 1} or self.own_affinity
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                os.sched_setaffinity(tid, self.own_affinity)
        sigtrap.restore_ignored(self.tracee, task, ptrace.PTRACE_O_EXITKILL
                                | ptrace.PTRACE_O_TRACESYSGOOD)
        return Restored(pid=self.pid, ns_pid=_ns_pid(self.pid),
                        restore_ms=(time.monotonic() - self.started) * 1000)

    def release(self) -> None:
        """Detach: threads first, the leader last: the process runs whole once it does."""
        assert self.tracee is not None
        for tid in reversed(self.tids):
            ptrace.detach(tid, 0)
        for sig in self.tracee.held_signals:
            os.kill(self.pid, sig)
        self.tracee.close()
        self.tracee = None
        self.pid = 0      # no longer ours to kill

    def _create_threads(self, inside: int) -> None:
        """clone3 every thread but the leader, in one batch of the leader,
        each stopping at birth (PTRACE_O_TRACECLONE)."""
        assert self.tracee is not None and self.base is not None
        task = self.meta.task
        if len(task.threads) == 1:
            return
        plain = ptrace.PTRACE_O_EXITKILL | ptrace.PTRACE_O_TRACESYSGOOD
        ptrace.set_options(self.pid, plain | ptrace.PTRACE_O_TRACECLONE)
        b = Batch(self.tracee.tramp + DATA_AT)
        tramp = self.tracee.tramp
        threads.clone_threads(b, task, tramp + DATA_END, STACK_TOP - DATA_END)
        try:
            made = self.tracee.run_batch(b, self.base)
        finally:
            ptrace.set_options(self.pid, plain)
            # Whatever was made is ours to wait for and, on failure, to kill.
            host = ({tid: tid for tid in proctask.list_threads(self.pid)}
                    if inside == self.pid else threads.host_tids(self.pid))
            for th in task.threads[1:]:
                if th.tid in host:
                    self.tids.append(host[th.tid])
        if made != [th.tid for th in task.threads[1:]]:
            raise SystemError_(f"threads were made with ids {made}, not the image's",
                               pid=self.pid)
        for tid in self.tids[1:]:
            threads.wait_born(tid)
        log.debug("threads_created", pid=self.pid, threads=len(self.tids))

    def _unmap_trampoline(self) -> None:
        """munmap the trampoline by single-stepping its own ``syscall``: a
        step over a syscall traps at the syscall's exit, before the task
        would fetch from the page it just unmapped. One round trip, where
        PTRACE_SYSCALL's entry and exit stops took two."""
        assert self.tracee is not None and self.base is not None
        tramp = self.tracee.tramp
        try:
            result = self.tracee.syscall(tramp, sysnr.MUNMAP, tramp, TRAMPOLINE_SIZE,
                                         base=self.base)
        except OSError as e:
            raise SystemError_(f"unmapping the trampoline: {e}", pid=self.pid) from e
        if result != 0:
            raise SystemError_(f"munmap of the trampoline failed: {result}", pid=self.pid)

    def abort(self) -> None:
        """Kill whatever was built; never raises."""
        if self.filler is not None:
            self.filler.close()   # before the tracee closes the fd it writes to
        files.unlink_all(self.temp_files)
        if self.tracee is not None:
            self.tracee.close()
        for host in self.helper_tids:
            try:
                os.kill(host, signal.SIGKILL)
            except ProcessLookupError:
                pass   # already gone
        ptrace.wait_exits(self.helper_tids, KILL_TIMEOUT)
        if self.pid:
            try:
                made = proctask.list_threads(self.pid)
            except OSError:
                made = []   # gone already
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass   # already gone
            # Traced threads stay zombies until their tracer (we) reaps them,
            # and the leader cannot be reaped before they are.
            ptrace.wait_exits(sorted(set(made + self.tids) - {self.pid}), KILL_TIMEOUT)
            try:
                while True:
                    _, status = os.waitpid(self.pid, 0x40000000)   # __WALL
                    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                        if not self.our_child:
                            break
                        continue
            except ChildProcessError:
                pass   # reaped (ours) or no longer traced (theirs)
            log.info("restore_aborted", pid=self.pid)
        try:
            os.sched_setaffinity(0, self.own_affinity)
        except OSError:
            pass   # best effort


def restore(reader: ImageReader, *, target: str = "host",
            stub: Callable[[dict[str, Any]], int | dict[str, Any] | None] | None = None,
            progress: Progress | None = None) -> Restored:
    """Read ``reader``, build the tree, return once it runs. ``stub(need)``
    answers the need message: None (host: we create the root), a stub pid,
    or the daemon's ``{"pid": ..., "log_path": ...}`` (container).

    The tree is made top down while every task is still the bare stub: each
    parent takes the lead of its session or group, then clones its children
    (who thus inherit both; a session can be entered only at birth) and they
    are copies of the stub, ready to be laid out like the root. Making them
    before the parent's own memory replaces the stub keeps the clone in the
    one piece of code we control, and the child has nothing of the parent's
    to undo but the stub. Then each task is laid out, pages filled (each
    page record names its VMA, unique in the tree, hence its task), each
    finished; all are detached at the end, children before parents."""
    started = time.monotonic()
    reader.keep_pages(memory.FILL_AHEAD + 1)
    procs, records, first = read_tree(reader)
    shared.check_image([(m.task.pid, m.mm, m.files) for m in procs])
    sharing = shared.Sharing([(m.task.pid, m.mm, m.files) for m in procs])
    need = need_message(procs[0])
    answer = stub(need) if stub is not None else None
    stub_pid, log_path = (answer.get("pid"), answer.get("log_path") or "") \
        if isinstance(answer, dict) else (answer, "")
    sessions = [RestoreSession(m, target=target) for m in procs]
    for s in sessions:
        s.started = started
    root = sessions[0]
    try:
        if stub_pid is None:
            _wait_pids_free(procs)
        for s in sessions:
            s.relocate_log(log_path)
        root.create_task(stub_pid)
        _make_tree(sessions)
        live = [s for s in sessions if not s.meta.task.zombie]
        for s in live:
            s.build(sharing)
        with root.unpinned():
            _fill_pages(live, reader, records, first, progress)
        done = [s.finish() for s in live]
        for s in reversed(live):
            s.release()
        os.sched_setaffinity(0, root.own_affinity)
        log.info("tree_restored", pid=done[0].pid, tasks=len(done),
                 restore_ms=round((time.monotonic() - started) * 1000, 1))
        return Restored(pid=done[0].pid, ns_pid=done[0].ns_pid,
                        restore_ms=(time.monotonic() - started) * 1000)
    except BaseException:
        for s in reversed(sessions):
            s.abort()
        raise


def _make_tree(sessions: list[RestoreSession]) -> None:
    """Every task, as a stub, with its pid, parent, session and group.

    A group or session whose leader has exited can only be made by a task
    with its pid: a helper (exit signal 0: its parent hears nothing) takes
    the lead, and exits once every member is in; its parent reaps it. A
    group helper is cloned by whoever clones the group's first member, in
    that one's session. A session helper is cloned by the root and clones
    the session's members whose parent is outside it: they were orphans
    reparented to the root, and become so again when the helper exits
    (the root must be the namespace's init or a child subreaper)."""
    root = sessions[0]
    pids = {s.meta.task.pid for s in sessions}
    by_pid = {s.meta.task.pid: s for s in sessions}
    cloner, sids = tree.session_cloners([s.meta.task for s in sessions])
    session_helpers = [RestoreSession(Metadata(root.meta.origin,
                                               tree.session_helper(sid, root.meta.task),
                                               image_pb2.Mm(), image_pb2.Files(), {}))
                       for sid in sids]
    by_pid.update((h.meta.task.pid, h) for h in session_helpers)
    helper_by: dict[int, list[int]] = {}   # cloner pid -> groups it makes helpers for
    # The root's group when it lies outside the tree (a host tree started
    # from a shell): not ours to make; its members join the root's group.
    outside = root.meta.task.pgid if root.meta.task.pgid not in by_pid else 0
    made_groups: set[int] = set(by_pid) | {outside}
    for s in sessions[1:]:
        g = s.meta.task.pgid
        if g and g not in made_groups:
            helper_by.setdefault(cloner[s.meta.task.pid], []).append(g)
            made_groups.add(g)
    order = [root] + session_helpers + sessions[1:]
    for s in order:
        s.tree_pids = pids
        s.helpers = made_groups - pids - {outside}
        s.outside_group = (outside, root)
    how = sharing_tables.plan([s.meta.task for s in order], cloner)
    flags = {pid: c.flags for pid, c in how.items()}
    by_sibling = {pid: c.source for pid, c in how.items()
                  if c.flags & sharing_tables.CLONE_PARENT}
    _wire_sharers(order, by_pid)
    helpers: list[tuple[RestoreSession, int, int]] = []   # (parent, ns pid, host pid)
    for s in order:   # parents first: each is adopted before it clones
        s.map_trampoline()
        me = s.meta.task.pid
        # Siblings that share its tables: made before it leads a session or
        # group of its own, so they are born in their parent's.
        sibs = [c for c in order[1:] if by_sibling.get(c.meta.task.pid) == me]
        for c, host in zip(sibs, s.clone_children([c.meta.task for c in sibs], flags)):
            c.adopt(host, s)
        s.lead()
        mine = [image_pb2.Task(pid=g, exit_signal=0) for g in helper_by.get(me, [])]
        children = [c for c in order[1:] if cloner[c.meta.task.pid] == me
                    and c.meta.task.pid not in by_sibling]
        made = s.clone_children(mine + [c.meta.task for c in children], flags)
        for g, host in zip(mine, made):
            s.lead_group_for(host, g.pid)
            helpers.append((s, g.pid, host))
        for c, host in zip(children, made[len(mine):]):
            c.adopt(host, s)
            if c in session_helpers:
                root.helper_tids.append(host)    # killed with the root on failure
    for s in order:
        if not s.pid:
            raise BugError(f"task {s.meta.task.pid} was never made (parent "
                           f"{s.meta.task.ppid} not in the tree?)")
        s.join_group()
    for parent, pid, host in helpers:
        parent.end_helper(pid, host)
    for h in session_helpers:
        assert h.tracee is not None
        h.tracee.close()
        h.tracee = None
        root.end_helper(h.meta.task.pid, h.pid)
        h.pid = 0
    for s in sessions:
        if s.meta.task.zombie:
            by_pid[s.meta.task.ppid].reap_later(s)


def _wire_sharers(order: list[RestoreSession], by_pid: dict[int, RestoreSession]) -> None:
    """Point each later sharer at the first one's session (its FdTable is
    then the same object) and mark the last fs / address-space sharers."""
    last_fs: dict[int, RestoreSession] = {}
    last_vm: dict[int, RestoreSession] = {}
    for s in order:
        t = s.meta.task
        if t.files_of:
            s.fds_from = by_pid[t.files_of]
            s.table = s.fds_from.table
        if t.vm_of:
            s.vm_from = by_pid[t.vm_of]
        last_fs[t.fs_of or t.pid] = s
        last_vm[t.vm_of or t.pid] = s
    for s in order:
        t = s.meta.task
        s.fs_last = last_fs[t.fs_of or t.pid] is s
        s.vm_last = last_vm[t.vm_of or t.pid] is s


def _wait_pids_free(procs: list[Metadata]) -> None:
    """Host target: every pid of the tree must be free; a zombie is on its
    way out (PID 1 reaps slowly), a live one is not."""
    deadline = time.monotonic() + PID_FREE_TIMEOUT
    for m in procs:
        for tid in [th.tid for th in m.task.threads] or [m.task.pid]:
            while True:
                try:
                    zombie = procfs.read_stat(tid).is_zombie
                except (ProcessLookupError, FileNotFoundError):
                    break
                if not zombie or time.monotonic() > deadline:
                    raise StateError(f"pid {tid} is taken by a running process: cannot "
                                     "restore with the original pid", pid=tid)
                time.sleep(0.005)


def _fill_pages(sessions: list[RestoreSession], reader: ImageReader, records: Iterator,
                first: PageRecord | None, progress: Progress | None) -> None:
    owner = {v.id: s for s in sessions for v in s.meta.mm.vmas}
    last = 0.0
    current: RestoreSession | None = None

    def fill(rec: PageRecord) -> None:
        nonlocal current
        s = owner.get(rec.vma_id)
        if s is None:
            raise ImageError(f"page data for an unknown VMA {rec.vma_id}", offset=rec.offset,
                             record=f"#{rec.index} PAGES")
        if s is not current and current is not None:
            # The last write must end before the reader lets go of its data.
            assert current.filler is not None
            current.filler.flush()
        current = s
        s.fill(rec)

    if first is not None:
        fill(first)
        for rec in records:
            if not isinstance(rec, PageRecord):
                raise ImageError(f"metadata record {rec.name} after page data",
                                 offset=rec.offset, record=rec.name)
            fill(rec)
            now = time.monotonic()
            if progress and now - last > 0.1:
                last = now
                progress("memory", reader.offset, 0)
    for s in sessions:
        s.pages_filled()


def _free_range(stub_vmas: list[proctask.SmapsVma], mm: image_pb2.Mm) -> int:
    busy = sorted([(v.start, v.end) for v in stub_vmas if v.start < memory.TASK_SIZE]
                  + [(v.start, v.end) for v in mm.vmas]
                  + ([(mm.vvar_start, mm.vvar_start + mm.vdso_size)] if mm.vvar_start else []))
    addr = TRAMPOLINE_SEARCH_FROM
    for start, end in busy:
        if addr + TRAMPOLINE_SIZE <= start:
            return addr
        if end > addr:
            addr = -(-end // TRAMPOLINE_ALIGN) * TRAMPOLINE_ALIGN
    if addr + TRAMPOLINE_SIZE <= memory.TASK_SIZE:
        return addr
    raise UnsupportedError("no room for the restore trampoline in the address space")


def _cpu_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def _ns_pid(pid: int) -> int:
    return int(procfs.read_status(pid).get("NSpid", str(pid)).split()[-1])




def _ns_ids(pid: int) -> tuple[int, int]:
    """(session, process group) of ``pid`` in its own PID namespace."""
    st = procfs.read_status(pid)
    return int(st["NSsid"].split()[-1]), int(st["NSpgid"].split()[-1])


def _child_ns_pids(pid: int) -> dict[int, int]:
    """Pid in the namespace -> host pid, of each child of ``pid``."""
    return {_ns_pid(c): c for c in proctask.read_children(pid)}
