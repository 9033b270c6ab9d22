"""Checkpoint orchestration: freeze -> seize -> check -> collect -> write,
then resume or kill as the caller asks.

Every process of the tree under the root is seized, top down (tree.py
says what each records of its place). Every thread is seized and interrupted (a process that is not frozen may
make new threads meanwhile: seize until a listing shows no new one); the
process-wide state is injected through the leader, each thread's own through
itself (threads.py).

``DumpSession`` holds the tree stopped between those steps; leaving it by
an error always resumes the task untouched (registers and scratch memory put
back, detached, thawed). Collection of everything except page contents
happens before the first byte of the image is written, so an unsupported
resource fails the checkpoint before anything is changed.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ckptd.engine import (files, identity, leaks, memory, probe, rlimits, shared,
                          sharing_tables, signals, sigtrap, threads, timers, tree)
from ckptd.engine.inject import Tracee
from ckptd.errors import CkptdError, NotFoundError, StateError, SystemError_, UnsupportedError
from ckptd.image import ImageWriter, new_header
from ckptd.image.registry import RecordType
from ckptd.kernel import freezer as freezer_mod
from ckptd.kernel.cgroupfs import Freezer
from ckptd.kernel import namespaces, procfs, proctask, ptrace, sysnr
from ckptd.v1 import image_pb2

log = structlog.get_logger(__name__)

V1_MOUNT = Path("/sys/fs/cgroup/freezer")
V2_MOUNT = Path("/sys/fs/cgroup/unified")
FREEZE_TIMEOUT = 5.0          # seconds; a cgroup that does not freeze by then is stuck
# Killed tasks exit at once; this only bounds a kernel that does not let them.
KILL_TIMEOUT = 10.0
# A process that makes threads faster than we can seize them is not going to
# hold still: give up after this many rounds of "seize the new ones".
SEIZE_ROUNDS = 100

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Dumped:
    bytes: int
    pages: int
    frozen_ms: float
    dump_ms: float
    # Private pages stored again although an earlier process of the tree
    # still maps the very same physical page (COW after fork): what a
    # deduplicating image would save.
    cow_shared_bytes: int = 0
    tasks: int = 1              # processes, zombies included


class _Proc:
    """One seized process of the tree: its threads (host tids, leader first)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tids: list[int] = []
        self.tracee: Tracee | None = None
        self.vm_of = 0        # ns pid of the first process sharing its address space


class DumpSession:
    """One checkpoint of the process tree under ``pid``: ``start``,
    ``collect``, ``write``, ``finish``. ``ignore_pids``: processes outside
    the tree whose sharing is expected (the caller's own, e.g. a container's
    shim); ``externals``: names of leaks to accept as private copies (leaks.py)."""

    def __init__(self, pid: int, *, cgroup: str | None = None,
                 freezer: str | None = None, ignore_pids: Collection[int] = (),
                 externals: Collection[str] = (), viewer: int = 0) -> None:
        self.pid = pid
        self.viewer = viewer   # the caller's uid: what a refusal may tell (leaks.py)
        self.ignore_pids = frozenset(ignore_pids)
        self.externals = leaks.parse_externals(externals)   # bad syntax: before any stop
        self.cgroup = Path(cgroup) if cgroup else Path()
        self.freezer: Freezer | None = (
            freezer_mod.make_freezer(freezer or "cgroup2", V1_MOUNT, V2_MOUNT)
            if cgroup else None)
        self.procs: list[_Proc] = []  # parents before children, the root first
        self.zombies: list[int] = []  # unreaped children (host pids): not seized
        self.frozen_at = 0.0
        self.ended_at: float | None = None   # when the tree was sent its death
        self.own_affinity = os.sched_getaffinity(0)
        self.collected: list[dict[str, Any]] = []
        self.zombie_tasks: list[image_pb2.Task] = []
        self.trap_guard = sigtrap.TrapGuard()
        self.origin: image_pb2.Origin | None = None
        self.linked = shared.Linked([], 0, 0)
        self.cow_shared_bytes = 0

    @property
    def seized(self) -> bool:
        return any(p.tids for p in self.procs)

    # -- stopping --
    def start(self) -> None:
        """Freeze (if a cgroup), seize and stop every process top down. A
        parent in vfork() takes no stop until its child execs or exits: the
        child alone runs on under ptrace until it does (sharing_tables.py),
        or the checkpoint is refused after VFORK_TIMEOUT, all let go."""
        _check_stoppable(self.pid, None)
        self.frozen_at = time.monotonic()
        if self.freezer is not None:
            try:
                self.freezer.freeze(self.cgroup, FREEZE_TIMEOUT)
            except OSError as e:
                raise SystemError_(f"cannot freeze {self.cgroup}: {e}") from e
        _pin_next_to(self.pid)
        # Top down: a stopped parent cannot fork, so once a process is
        # stopped its list of children is final. Frozen tasks take the
        # interrupt trap only once thawed, but a frozen tree cannot fork either.
        frontier = [self.pid]
        waiting: list[tuple[_Proc, list[int]]] = []
        # vfork parents (frozen: seized once their children ran to exec) and
        # vfork children (left running until they exec or exit).
        deferred: list[tuple[_Proc, list[int]]] = []
        self.vforked: dict[int, _Proc | None] = {}
        self._stopped_vforked: set[int] = set()
        try:
            self._seize_tree(frontier, waiting, deferred)
        except BaseException:
            self._let_go_vforked()
            raise
        for p in self.procs:
            p.tracee = Tracee(p.pid)
        # Before our first trap: it would reset a blocked or ignored SIGTRAP.
        self.trap_guard.arm([(p.tracee, p.tids) for p in self.procs if p.tracee])

    def _seize_tree(self, frontier: list[int], waiting: list[tuple[_Proc, list[int]]],
                    deferred: list[tuple[_Proc, list[int]]]) -> None:
        while frontier:
            level: list[tuple[_Proc, list[int]]] = []
            made: list[_Proc] = []
            for pid in frontier:
                p = _Proc(pid)
                self.procs.append(p)
                made.append(p)
                if pid in self.vforked:
                    self.vforked[pid] = p
                    if p.pid in self._stopped_vforked:
                        p.tids = [pid]
                        level.append((p, []))
                    continue
                kids = sharing_tables.vfork_children(pid)
                self.vforked.update((k, None) for k in kids)
                if kids and self.freezer is not None:
                    deferred.append((p, kids))    # frozen: they run once thawed
                    continue
                if kids:
                    self._run_vfork_children(pid, kids)
                level.append((p, self._seize_first(p)))
            if self.freezer is None:
                for p, tids in level:
                    self._settle(p, tids)
            else:
                waiting += level
            frontier = []
            for p in made:
                for child in proctask.read_children(p.pid):
                    if _check_stoppable(child, p.pid):
                        frontier.append(child)
                    else:
                        self.zombies.append(child)
        if self.freezer is not None:
            # The interrupt trap is taken once the task runs again; it stays
            # stopped under ptrace, which the freezer counts as frozen.
            self.freezer.thaw(self.cgroup, FREEZE_TIMEOUT)
            for p, tids in waiting:
                self._settle(p, tids)
            # Only vfork children run now; their parents return from vfork
            # when they exec and are seized right then (they may run a few
            # instructions first: a frozen cgroup cannot thaw one task).
            for p, kids in deferred:
                self._run_vfork_children(p.pid, kids)
                self._settle(p, self._seize_first(p))
                for kid in kids:
                    self._vforked_settled(kid)

    def _run_vfork_children(self, parent: int, kids: list[int]) -> None:
        """Let each vfork child of ``parent`` run to its exec (then it is
        stopped, seized) or exit; UnsupportedError if one does not in time."""
        deadline = time.monotonic() + sharing_tables.VFORK_TIMEOUT
        for kid in kids:
            if sharing_tables.run_vfork_child(parent, kid, deadline):
                self._stopped_vforked.add(kid)

    def _vforked_settled(self, kid: int) -> None:
        """Frozen case: the vfork child's _Proc, made while it still ran,
        becomes an ordinary stopped process or, if it exited, a zombie."""
        p = self.vforked.get(kid)
        if p is None:
            return
        if kid in self._stopped_vforked:
            p.tids = [kid]
            return
        self.procs.remove(p)
        try:
            if procfs.read_stat(kid).is_zombie:
                self.zombies.append(kid)
        except (ProcessLookupError, FileNotFoundError):
            pass   # reaped by its parent already: not part of the tree any more

    def _let_go_vforked(self) -> None:
        """On failure: vfork children we stopped but never listed as seized."""
        listed = {p.pid for p in self.procs if p.tids}
        for kid in self._stopped_vforked - listed:
            try:
                ptrace.detach(kid, 0)
            except ProcessLookupError:
                pass   # gone: nothing to let go
        self._stopped_vforked = set()

    def _seize_first(self, p: _Proc) -> list[int]:
        try:
            ptrace.seize(p.pid, 0)
            p.tids = [p.pid]
            ptrace.interrupt(p.pid)
        except OSError as e:
            raise SystemError_(f"cannot seize pid {p.pid}: {e.strerror}", pid=p.pid) from e
        return [p.pid] + self._seize_new(p)

    def _settle(self, p: _Proc, waiting: list[int]) -> None:
        """Wait for every thread's stop. Threads not frozen may make new
        threads until they stop: seize those too, until a listing shows
        nothing new (stopped threads cannot clone)."""
        for _ in range(SEIZE_ROUNDS):
            for tid in waiting:
                self._wait_interrupted(p, tid)
            waiting = self._seize_new(p)
            if not waiting:
                return
        raise StateError(f"pid {p.pid} keeps making threads", pid=p.pid)

    def _seize_new(self, p: _Proc) -> list[int]:
        new = []
        for tid in proctask.list_threads(p.pid):
            if tid in p.tids:
                continue
            try:
                ptrace.seize(tid, 0)
            except ProcessLookupError:
                continue    # it exited meanwhile
            except OSError as e:
                # The kernel refuses to attach to a thread that is exiting
                # (EPERM): once it is gone, it was never part of the tree.
                if e.errno == errno.EPERM and _thread_exiting(p.pid, tid):
                    continue
                raise SystemError_(f"cannot seize thread {tid} of pid {p.pid}: "
                                   f"{e.strerror}", pid=p.pid) from e
            p.tids.append(tid)
            new.append(tid)
            try:
                ptrace.interrupt(tid)
            except ProcessLookupError:
                pass   # exiting: its exit is what the wait will see
        return new

    def _wait_interrupted(self, p: _Proc, tid: int) -> None:
        while True:
            stop = ptrace.wait_stop(tid)
            if stop.exited:
                p.tids.remove(tid)
                if tid == p.pid:
                    p.tids = []
                    raise NotFoundError(f"pid {p.pid} exited while being seized",
                                        pid=p.pid)
                return     # a thread that ended: nothing to dump
            if stop.event == ptrace.PTRACE_EVENT_STOP:
                return
            # A signal arrived first: let it be delivered, the trap follows.
            ptrace.cont(tid, stop.sig)

    # -- collecting --
    def collect(self, source: dict[str, Any] | None = None) -> None:
        """Everything but page contents; UnsupportedError before any change."""
        pids = [p.pid for p in self.procs]
        if self.freezer is not None:
            others = sorted(set(self.freezer.procs(self.cgroup)) - set(pids + self.zombies))
            if others:
                raise UnsupportedError(f"cgroup {self.cgroup} holds processes {others} "
                                       f"outside the tree of pid {self.pid}",
                                       pid=self.pid, kind="children")
        to_ns = {pid: tree.ns_pid(pid) for pid in pids + self.zombies}
        sharing = sharing_tables.dump_sharing(pids, to_ns)
        next_vma = 1
        for p in self.procs:
            p.vm_of = sharing[p.pid].get("vm_of", 0)
            c = self._collect_process(p, next_vma)
            tree.dump_place(p.pid, c["task"], to_ns, self.pid)
            for field, first in sharing[p.pid].items():
                setattr(c["task"], field, first)
            if c["task"].files_of:    # the first sharer's FILES are the table
                del c["files"].fds[:]
                c["file_data"] = []
            next_vma += len(c["mm"].vmas)
            self.collected.append(c)
        tasks = [c["task"] for c in self.collected]
        self.zombie_tasks = [tree.dump_zombie(pid, to_ns, self.pid) for pid in self.zombies]
        # The shape a restore must make, refused now if it cannot.
        cloner, sids = tree.session_cloners(tasks + self.zombie_tasks)
        sharing_tables.plan([tasks[0]] + [tree.session_helper(s, tasks[0]) for s in sids]
                            + tasks[1:], cloner)
        leaks.check(self.pid, pids, [c["files"] for c in self.collected], zombies=self.zombies,
                    ignore=self.ignore_pids, accept=self.externals, viewer=self.viewer)
        self.linked = shared.link(self.collected)
        if len(self.collected) > 1:    # one process shares with nobody
            self.cow_shared_bytes = shared.count_cow_shared(
                [shared.cow_keys(c["pid"], c["spans"]) for c in self.collected])
        root_mm = self.collected[0]["mm"]
        self.origin = _origin(self.pid, source or {"kind": "host"}, root_mm,
                              [to_ns[pid] for pid in pids + self.zombies])

    def _collect_process(self, p: _Proc, first_vma: int) -> dict[str, Any]:
        """One process: from /proc and ptrace, and what only it can tell from
        one probe per thread, run through a parasite mapped for the while
        (probe.py) when the process allows one."""
        pid = p.pid
        assert p.tracee is not None
        _pin_next_to(pid)
        fds, file_data = files.dump_files(pid)
        # maps, not smaps: only addresses and names are needed here, and
        # smaps makes the kernel walk every page table.
        vmas = proctask.parse_smaps(proctask.read_maps(pid))
        statuses = {tid: procfs.read_status(tid) for tid in p.tids}
        regs = ptrace.get_regs(pid)
        gadget = probe.find_gadget(p.tracee, vmas)
        parasite = probe.Parasite(p.tracee, regs, vmas, gadget)
        try:
            # A seccomp filter would judge our mmap too (and may kill for it).
            if all(st.get("Seccomp", "0") == "0" for st in statuses.values()):
                parasite.attach()
            q = probe.Probe(p.tracee, regs, vmas, gadget)
            brk = q.ask(sysnr.BRK, 0, what="brk")
            leader = threads.dump_thread(pid, q, regs, statuses[pid])
            sigactions = signals.dump_sigactions(q)
            itimers = timers.dump_itimers(q)
            posix_timers = timers.dump_posix_timers(q, pid)
            task = image_pb2.Task(host_pid=pid,
                                  shared_pending=signals.dump_pending(pid, shared=True),
                                  rlimits=rlimits.dump_rlimits(pid))
            attrs = identity.dump_task_attrs(pid, q, task, statuses[pid])
            q.run()
            others = self._dump_threads(p, vmas, gadget, statuses)
        finally:
            parasite.detach()
        # After the parasite is gone: smaps must not show it. One address
        # space is dumped once, by its first sharer.
        mm, spans = ((image_pb2.Mm(), []) if p.vm_of
                     else memory.dump_mm(pid, brk.result, first_vma))
        dumped = [leader(), *others]
        ns_tids = {tid: th.tid for tid, th in zip(p.tids, dumped)}
        task.pid = ns_tids[pid]
        task.threads.extend(dumped)
        task.sigactions.extend(sigactions())
        task.itimers.extend(itimers())
        task.posix_timers.extend(posix_timers())
        attrs()
        self.trap_guard.fix(pid, task, p.tids)
        for t in task.posix_timers:
            t.notify_tid = ns_tids.get(t.notify_tid, t.notify_tid)
        return dict(pid=pid, task=task, mm=mm, files=fds, file_data=file_data, spans=spans)

    def _dump_threads(self, p: _Proc, vmas: list[proctask.SmapsVma], gadget: int,
                      statuses: dict[int, dict[str, str]]) -> list[image_pb2.Thread]:
        """Every thread but the leader, in tid order. We move to each one's
        CPU before injecting through it (round trips across CPUs cost ~10x),
        taking them CPU by CPU."""
        assert p.tracee is not None
        out = {}
        by_cpu = sorted(p.tids[1:], key=lambda tid: (_cpu_of(tid), tid))
        try:
            for tid in by_cpu:
                _pin_next_to(tid)
                q = probe.Probe(p.tracee.thread(tid), ptrace.get_regs(tid), vmas, gadget)
                answer = threads.dump_thread(tid, q, q.regs, statuses[tid])
                q.run()
                out[tid] = answer()
        finally:
            _pin_next_to(p.pid)
        return [out[tid] for tid in p.tids[1:]]

    # -- writing --
    def write(self, sink, progress: Progress | None = None) -> Dumped:
        started = time.monotonic()
        # No ptrace round trips from here on: run on every CPU we may, so
        # that the checksum thread does not share one core with the copy.
        os.sched_setaffinity(0, self.own_affinity)
        page_total = (sum(memory.page_bytes(c["spans"]) for c in self.collected)
                      + self.linked.bytes)
        writer = ImageWriter(sink)
        # On failure too the writer's checksum thread must be done with the
        # sink (it may be filling a prepared file's mapping) before we return.
        with writer:
            origin = self.origin
            assert origin is not None
            header = new_header(container_id=origin.container_id,
                                container_name=origin.container_name, pid=self.pid)
            writer.write_header(header)
            writer.write_message(RecordType.RECORD_TYPE_ORIGIN, origin)
            for c in self.collected:
                writer.write_message(RecordType.RECORD_TYPE_TASK, c["task"])
                writer.write_message(RecordType.RECORD_TYPE_MM, c["mm"])
                writer.write_message(RecordType.RECORD_TYPE_FILES, c["files"])
                for d in c["file_data"]:
                    writer.write_message(RecordType.RECORD_TYPE_FILE_DATA, d)
            for z in self.zombie_tasks:
                writer.write_message(RecordType.RECORD_TYPE_TASK, z)
            meta = writer.bytes_written
            total = meta + page_total
            if progress:
                progress("memory", meta, total)
            last = [0.0]
            before = [0]

            def page_progress(done: int) -> None:
                now = time.monotonic()
                if progress and now - last[0] > 0.1:
                    last[0] = now
                    progress("memory", meta + before[0] + done, total)

            for c in self.collected:
                memory.write_pages(c["pid"], c["spans"], writer, page_progress)
                before[0] += memory.page_bytes(c["spans"])
            shared.write_object_pages(self.linked.spans, writer, page_progress)
            writer.close()
        dumped = Dumped(bytes=writer.bytes_written, pages=page_total // memory.PAGE,
                        frozen_ms=(time.monotonic() - self.frozen_at) * 1000,
                        dump_ms=(time.monotonic() - started) * 1000,
                        cow_shared_bytes=self.cow_shared_bytes,
                        tasks=len(self.procs) + len(self.zombie_tasks))
        log.info("tree_dumped", pid=self.pid, tasks=len(self.procs), bytes=dumped.bytes,
                 pages=dumped.pages, dump_ms=round(dumped.dump_ms, 1),
                 shared_memory_objects=self.linked.objects,
                 shared_memory_bytes=self.linked.bytes,
                 shared_descriptions=self.linked.descriptions,
                 cow_shared_bytes=dumped.cow_shared_bytes)
        return dumped

    # -- letting go --
    def finish(self, kill: bool = False) -> float:
        """Resume (detach while frozen, then thaw) or kill; frozen ms: until
        the tree runs again, or until it was sent its death (collecting the
        exits of a large tree, whose memory the kernel frees, is not frozen
        time: no task of it runs again)."""
        self.ended_at = None
        try:
            if kill:
                self._kill()
            else:
                self._resume()
        finally:
            for p in self.procs:
                if p.tracee is not None:
                    p.tracee.close()
                    p.tracee = None
            os.sched_setaffinity(0, self.own_affinity)
        return ((self.ended_at or time.monotonic()) - self.frozen_at) * 1000

    def _resume(self) -> None:
        fz, cg = self.freezer, self.cgroup
        if not self.seized:
            if fz is not None and self.frozen_at:
                _quiet(lambda: fz.thaw(cg, FREEZE_TIMEOUT))
            return
        # Still thawed: it runs the tasks up to syscall stops (a frozen
        # task would never reach them).
        self.trap_guard.restore_all()
        if fz is not None:
            _quiet(lambda: fz.freeze(cg, FREEZE_TIMEOUT))
        for p in reversed(self.procs):
            for tid in reversed(p.tids):
                try:
                    ptrace.detach(tid, 0)
                except ProcessLookupError:
                    pass    # it died meanwhile (SIGKILL from someone): nothing to resume
            p.tids = []
        if fz is not None:
            _quiet(lambda: fz.thaw(cg, FREEZE_TIMEOUT))
        log.info("task_resumed", pid=self.pid)

    def _kill(self) -> None:
        if self.freezer is not None:
            self.freezer.kill_all(self.cgroup)
        else:
            for p in self.procs:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass   # already gone: the goal
        self.ended_at = time.monotonic()
        if self.seized:
            # Collect the tracees' exits so the kernel can hand each process to
            # its parent: traced threads stay zombies until we do, and a
            # leader cannot be collected before its threads.
            tids = [tid for p in self.procs for tid in p.tids]
            left = ptrace.wait_exits(tids, KILL_TIMEOUT)
            if left:
                log.warning("tracees_not_collected", pid=self.pid, tids=left)
            for p in self.procs:
                p.tids = []
        log.info("task_killed", pid=self.pid)


def _thread_exiting(pid: int, tid: int) -> bool:
    """Whether thread ``tid`` of ``pid`` is dead or on its way out."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X", "x")


def _check_stoppable(pid: int, parent: int | None) -> bool:
    """Whether ``pid`` can be seized; False for a zombie child of the tree."""
    try:
        stat = procfs.read_stat(pid)
    except (ProcessLookupError, FileNotFoundError):
        raise NotFoundError(f"no process with pid {pid}", pid=pid) from None
    if stat.is_zombie and stat.num_threads > 1:
        # pthread_exit in main: the leader is a zombie, its threads run on.
        raise UnsupportedError(f"the main thread of pid {pid} has exited and "
                               f"{stat.num_threads - 1} other threads run on; such a "
                               "process cannot be checkpointed yet", pid=pid, kind="threads")
    if stat.is_zombie and parent is None:
        raise StateError(f"pid {pid} is a zombie", pid=pid)
    return not stat.is_zombie


def _quiet(fn: Callable[[], object]) -> None:
    try:
        fn()
    except (OSError, CkptdError) as e:
        log.warning("cleanup_step_failed", error=str(e))


def _pin_next_to(pid: int) -> None:
    """Run on the CPU the task last ran on: ptrace round trips across CPUs
    cost ~10x more (MACHINE.md)."""
    cpu = _cpu_of(pid)
    if cpu < 0:
        return
    try:
        # Moving costs ~0.1-0.5 ms: only when not already there.
        if os.sched_getaffinity(0) != {cpu}:
            os.sched_setaffinity(0, {cpu})
    except OSError:
        pass   # pinning is an optimisation only


def _cpu_of(tid: int) -> int:
    """The CPU a task last ran on; -1 if unknown."""
    try:
        with open(f"/proc/{tid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return -1


def _origin(pid: int, source: dict[str, Any], mm: image_pb2.Mm,
            pids: list[int]) -> image_pb2.Origin:
    kind = source.get("kind") or "host"
    try:
        # What the task sees now: it may have renamed its host since it started.
        hostname, domain = namespaces.uts_names(pid)
    except OSError:
        hostname, domain = source.get("hostname") or "", ""
    return image_pb2.Origin(kind=kind, container_id=source.get("container_id") or "",
                            container_name=source.get("container_name") or "",
                            hostname=hostname, domainname=domain,
                            network=source.get("network") or ("host" if kind == "host" else ""),
                            log_path=source.get("log_path") or "",
                            root_pid=pid, root_ns_pid=pids[0], pids=pids,
                            vdso_fingerprint=memory.vdso_fingerprint(pid) if mm.vdso_start
                            else "")
