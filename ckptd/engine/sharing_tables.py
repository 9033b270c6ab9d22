"""Kernel objects that processes of a tree share: an fd table (CLONE_FILES),
cwd/root/umask (CLONE_FS), an address space (CLONE_VM without CLONE_THREAD)
and signal handlers (CLONE_SIGHAND, which the kernel allows only with
CLONE_VM); and vfork children caught before their exec.

Dump: kcmp orders each kind of object, so sorting the processes by it puts
sharers side by side (n log n calls). Each later sharer (tree order, parents
first) records the ns pid of the group's first one (Task.files_of, fs_of,
vm_of, sighand_of); it records no fds / no memory of its own.

Restore: every task is cloned while all are still the bare stub, so a later
sharer is simply cloned with the CLONE_* flags of what it shares by a task
that already holds those objects: its parent if the parent is in the same
groups, else an earlier sibling that is, with CLONE_PARENT (the sibling's
parent becomes its parent; clone3 then gives it the sibling's exit signal,
so the two must have the same). Any other shape (a grandparent's table and
not the parent's) is refused, naming the pids. Who does what once:
the first fd-table sharer closes the stub's fds and opens the image's (the
others use the same ``FdTable``); the first address-space sharer lays out
and fills the memory and sets the mm fields, the last one unmaps the
trampoline; the last fs sharer does chdir/chroot (after a chroot, the
absolute paths the others still open would resolve inside it).

vfork: the parent sleeps in the kernel until its child execs or exits and
takes no ptrace stop meanwhile; ``run_vfork_child`` lets the child (alone)
run on under ptrace until it does.
"""

from __future__ import annotations

import functools
import os
import struct
import time
from dataclasses import dataclass

import structlog

from ckptd.errors import ImageError, StateError, UnsupportedError
from ckptd.kernel import proctask, ptrace, sysnr
from ckptd.kernel import task as task_mod
from ckptd.v1 import image_pb2

log = structlog.get_logger(__name__)

CLONE_VFORK = 0x4000
CLONE_PARENT = 0x8000
SYS_CLONE, SYS_VFORK = 56, 58
# How long a vfork child may take to exec or exit while the rest of the tree
# is held: a shell's fork+exec takes milliseconds; a child that sleeps
# longer than this before exec is not going to let its parent stop soon.
VFORK_TIMEOUT = 2.0
VFORK_POLL = 0.002
WALL = 0x40000000            # waitpid __WALL: also clone children

# (Task field, kcmp kind, clone flag, what it is)
KINDS = (("files_of", task_mod.KCMP_FILES, sysnr.CLONE_FILES, "an fd table (CLONE_FILES)"),
         ("fs_of", task_mod.KCMP_FS, sysnr.CLONE_FS, "a cwd/root/umask (CLONE_FS)"),
         ("vm_of", task_mod.KCMP_VM, sysnr.CLONE_VM, "an address space (CLONE_VM)"),
         ("sighand_of", task_mod.KCMP_SIGHAND, sysnr.CLONE_SIGHAND,
          "signal handlers (CLONE_SIGHAND)"))
FIELDS = tuple(k[0] for k in KINDS)


# -- dump --
def dump_sharing(pids: list[int], to_ns: dict[int, int]) -> dict[int, dict[str, int]]:
    """Host pid -> {field: ns pid of the first sharer} of every later
    sharer; ``pids`` in tree order."""
    out: dict[int, dict[str, int]] = {pid: {} for pid in pids}
    rank = {pid: i for i, pid in enumerate(pids)}
    for field, kind, _, _ in KINDS:
        for group in _groups(pids, kind):
            first = min(group, key=rank.__getitem__)
            for pid in group:
                if pid != first:
                    out[pid][field] = to_ns[first]
    return out


def _groups(pids: list[int], kind: int) -> list[list[int]]:
    order = {0: 0, 1: -1, 2: 1}
    def compare(a: int, b: int) -> int:
        return order.get(task_mod.kcmp(a, b, kind), 0)

    ranked = sorted(pids, key=functools.cmp_to_key(compare))
    groups: list[list[int]] = []
    for i, pid in enumerate(ranked):
        if i and task_mod.kcmp(ranked[i - 1], pid, kind) == 0:
            groups[-1].append(pid)
        else:
            groups.append([pid])
    return [g for g in groups if len(g) > 1]


# -- the image --
def check_sharing(tasks: list[image_pb2.Task], live: dict[int, tuple[int, int]]) -> None:
    """Each sharing field names a live task before it that is itself the
    first of its group; a later sharer carries no fds / VMAs of its own.
    ``live`` maps each live task's pid to (its fd count, its VMA count)."""
    before: set[int] = set()
    by_pid = {t.pid: t for t in tasks}
    for t in tasks:
        for field in FIELDS:
            first = getattr(t, field)
            if not first:
                continue
            if t.pid not in live:
                raise ImageError(f"zombie {t.pid} claims to share {field[:-3]} of task "
                                 f"{first}", record="TASK")
            if first not in before or first not in live:
                raise ImageError(f"task {t.pid} shares {field[:-3]} of task {first}, which "
                                 "is not a live task before it", record="TASK")
            if getattr(by_pid[first], field):
                raise ImageError(f"task {t.pid} shares {field[:-3]} of task {first}, which "
                                 f"shares it with {getattr(by_pid[first], field)} in turn",
                                 record="TASK")
        if t.sighand_of and _first(by_pid, t.sighand_of, "vm_of") != _first(by_pid, t.pid,
                                                                          "vm_of"):
            raise ImageError(f"task {t.pid} shares signal handlers with {t.sighand_of} "
                             "but not its address space", record="TASK")
        if t.files_of and live[t.pid][0]:
            raise ImageError(f"task {t.pid} shares the fd table of {t.files_of} but records "
                             "fds of its own", record="FILES")
        if t.vm_of and live[t.pid][1]:
            raise ImageError(f"task {t.pid} shares the address space of {t.vm_of} but "
                             "records VMAs of its own", record="MM")
        before.add(t.pid)


def _first(by_pid: dict[int, image_pb2.Task], pid: int, field: str) -> int:
    return getattr(by_pid[pid], field) or pid


# -- restore --
@dataclass(frozen=True)
class Clone:
    """How a sharer is made: by ``source`` (ns pid) with ``flags``."""

    source: int
    flags: int


def plan(tasks: list[image_pb2.Task], cloner: dict[int, int]) -> dict[int, Clone]:
    """For each task that shares something with an earlier one (``tasks``
    in tree order, ``cloner``: ns pid -> ns pid of who clones it): who runs
    the clone and with which flags. UnsupportedError for shapes no clone
    can make."""
    by_pid = {t.pid: t for t in tasks}
    siblings: dict[int, list[int]] = {}
    out: dict[int, Clone] = {}
    for t in tasks:
        if t.pid not in cloner:
            continue    # the root
        parent = cloner[t.pid]
        mine = siblings.setdefault(parent, [])
        needs = [(field, flag) for field, _, flag, _ in KINDS if getattr(t, field)]
        if needs:
            flags = sum(flag for _, flag in needs)

            def holds(src: int) -> bool:
                return src in by_pid and all(
                    _first(by_pid, src, f) == getattr(t, f) for f, _ in needs)

            if holds(parent):
                out[t.pid] = Clone(parent, flags)
            else:
                sib = next((s for s in mine if holds(s)
                            and by_pid[s].exit_signal == t.exit_signal), None)
                if sib is None:
                    what = ", ".join(k[3] for k in KINDS if getattr(t, k[0]))
                    firsts = sorted({getattr(t, f) for f, _ in needs})
                    raise UnsupportedError(
                        f"pid {t.pid} shares {what} with pid(s) {firsts}, which are neither "
                        f"its parent {parent} nor a sibling with the same exit signal: no "
                        "clone can rebuild that", pid=t.pid, kind="shared table")
                out[t.pid] = Clone(sib, flags | CLONE_PARENT)
        mine.append(t.pid)
    return out


# -- vfork --
def vfork_children(pid: int) -> list[int]:
    """Children of ``pid`` made by a vfork (or clone with CLONE_VFORK) that
    a thread of ``pid`` is still waiting for: they share its address space
    and a thread of it sleeps in that clone."""
    kids = []
    for child in proctask.read_children(pid):
        try:
            if task_mod.kcmp(pid, child, task_mod.KCMP_VM) == 0:
                kids.append(child)
        except ProcessLookupError:
            continue   # gone meanwhile
    if kids and not any(_in_vfork(pid, tid) for tid in proctask.list_threads(pid)):
        return []      # a CLONE_VM child, not a vfork: an ordinary sharer
    return kids


def _in_vfork(pid: int, tid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    if not fields or not fields[0].isdigit():
        return False     # running, or not in a syscall
    nr, args = int(fields[0]), [int(a, 16) for a in fields[1:7]]
    if nr == SYS_VFORK:
        return True
    if nr == SYS_CLONE:
        return bool(args[0] & CLONE_VFORK)
    if nr == sysnr.CLONE3:
        try:
            with open(f"/proc/{pid}/mem", "rb") as m:
                m.seek(args[0])
                return bool(struct.unpack("<Q", m.read(8))[0] & CLONE_VFORK)
        except (OSError, struct.error, ValueError):
            return False
    return False


def run_vfork_child(parent: int, child: int, deadline: float) -> bool:
    """Seize ``child`` (a vfork child of ``parent``, left running) and let
    it run until it execs (then stop it: it is an ordinary process, and its
    parent returns from vfork) or exits. True if it is stopped under ptrace
    (seized by us), False if it exited. By ``deadline`` it is stopped, let
    go untouched, and an UnsupportedError names both pids."""
    try:
        ptrace.seize(child, ptrace.PTRACE_O_TRACEEXEC)
    except ProcessLookupError:
        return False
    while True:
        got, status = _wait_until(child, deadline)
        if got == 0:
            _let_go(child)
            raise UnsupportedError(
                f"pid {parent} is in vfork() and its child {child} has neither exec'd nor "
                f"exited within {VFORK_TIMEOUT} s: the parent cannot be stopped until it "
                "does", pid=parent, kind="vfork")
        stop = ptrace.Stop(child, status)
        if stop.exited:
            log.debug("vfork_child_exited", pid=parent, child=child)
            return False
        if stop.event == ptrace.PTRACE_EVENT_EXEC:
            # From here it is a process of its own; stop it where the exec
            # returns to user space (registers at the exec stop are not final).
            ptrace.interrupt(child)
            ptrace.cont(child)
            _wait_interrupt(child)
            log.debug("vfork_child_execed", pid=parent, child=child)
            return True
        ptrace.cont(child, stop.sig if stop.event == 0 else 0)


def _wait_until(pid: int, deadline: float) -> tuple[int, int]:
    while True:
        got, status = os.waitpid(pid, WALL | os.WNOHANG)
        if got or time.monotonic() >= deadline:
            return got, status
        time.sleep(VFORK_POLL)


def _wait_interrupt(pid: int) -> None:
    while True:
        stop = ptrace.wait_stop(pid)
        if stop.exited:
            raise StateError(f"pid {pid} {stop.describe()} right after its exec", pid=pid)
        if stop.event == ptrace.PTRACE_EVENT_STOP:
            return
        ptrace.cont(pid, stop.sig if stop.event == 0 else 0)


def _let_go(pid: int) -> None:
    """Stop a running tracee and detach it, passing on any signal it got."""
    try:
        ptrace.interrupt(pid)
        _wait_interrupt(pid)
        ptrace.detach(pid, 0)
    except (ProcessLookupError, StateError):
        pass   # it exited meanwhile: nothing left to let go
