"""The process tree: who is whose child, in which group and session, and what
processes of the tree may not share (yet).

Dump: each task's pid, real parent (ppid: an orphan's is the init it was
reparented to, not its creator), process group, session and exit signal,
all in the tree's PID namespace. Before anything is written, tables
shared between processes that a restore would split are refused, naming the
pids. Anonymous MAP_SHARED memory and open file descriptions shared between
processes are not refused: shared.py restores them as one object.

Restore: ``order`` lists the tasks parents first; each parent clones its
children itself (restore.py), so the tree's shape and pids come back with it.
"""

from __future__ import annotations

import functools

from ckptd.errors import ImageError, UnsupportedError
from ckptd.kernel import procfs, proctask
from ckptd.kernel import task as task_mod
from ckptd.v1 import image_pb2

PID_MAX = 1 << 22             # PID_MAX_LIMIT on 64-bit
# A tree larger than this is surely not an image we wrote (and would take
# minutes to rebuild task by task).
MAX_TASKS = 4096
_STAT_EXIT_SIGNAL = 35        # field 38 of /proc/PID/stat, counted after the comm
_STAT_EXIT_CODE = 49          # field 52: a zombie's wait status


def exit_signal(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[_STAT_EXIT_SIGNAL])


def ns_pid(pid: int) -> int:
    return int(procfs.read_status(pid).get("NSpid", str(pid)).split()[-1])


def dump_place(pid: int, task: image_pb2.Task, to_ns: dict[int, int], root: int) -> None:
    """Fill ``task``'s place in the tree; ``to_ns`` maps host pids of the
    tree to their pids in its namespace."""
    st = procfs.read_status(pid)
    host_ppid = int(st.get("PPid", "0"))
    task.ppid = 0 if pid == root else to_ns[host_ppid]
    task.pgid = int(st.get("NSpgid", "0").split()[-1])
    task.sid = int(st.get("NSsid", "0").split()[-1])
    task.exit_signal = exit_signal(pid)


def dump_zombie(pid: int, to_ns: dict[int, int], root: int) -> image_pb2.Task:
    """An unreaped child: its place in the tree and the status its parent
    will reap."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    task = image_pb2.Task(pid=to_ns[pid], host_pid=pid, zombie=True,
                          wait_status=int(fields[_STAT_EXIT_CODE]) & 0xFFFF)
    dump_place(pid, task, to_ns, root)
    return task


# What processes made with CLONE_VM (vfork children before their exec),
# CLONE_FILES or CLONE_FS share, as kcmp names it.
_SHARED_TABLES = ((task_mod.KCMP_VM, "an address space (a vfork child before its exec?)"),
                  (task_mod.KCMP_FILES, "an fd table (CLONE_FILES)"),
                  (task_mod.KCMP_FS, "a cwd/root/umask (CLONE_FS)"))


def check_vfork(pid: int) -> None:
    """Before seizing ``pid``: a parent waiting for its vfork child would
    never take the interrupt trap, and the two share one address space."""
    for child in proctask.read_children(pid):
        try:
            same = task_mod.kcmp(pid, child, task_mod.KCMP_VM) == 0
        except ProcessLookupError:
            continue   # gone meanwhile
        if same:
            raise UnsupportedError(f"pids {pid} and {child} share an address space (a vfork "
                                   "child before its exec): not supported yet", pid=child,
                                   kind="vfork")


def check_shared(pids: list[int], fds: list[image_pb2.Files]) -> None:
    """Refuse what processes of the tree share and a restore would split."""
    _check_shared_tables(pids)


def _check_shared_tables(pids: list[int]) -> None:
    """kcmp orders the objects, so sorting by it puts sharers side by side:
    n log n calls, not n^2."""
    for kind, what in _SHARED_TABLES:
        order = {0: 0, 1: -1, 2: 1}
        ranked = sorted(pids, key=functools.cmp_to_key(
            lambda a, b: order.get(task_mod.kcmp(a, b, kind), 0)))
        for a, b in zip(ranked, ranked[1:]):
            if task_mod.kcmp(a, b, kind) == 0:
                raise UnsupportedError(f"pids {min(a, b)} and {max(a, b)} share {what}: not "
                                       "supported yet", pid=min(a, b), kind="shared table")


def check_tree(tasks: list[image_pb2.Task]) -> None:
    """The image's tasks form one tree, parents before children, pids unique."""
    if not 1 <= len(tasks) <= MAX_TASKS:
        raise ImageError(f"{len(tasks)} tasks in the image", record="TASK")
    seen: set[int] = set()
    for i, t in enumerate(tasks):
        if not 1 <= t.pid < PID_MAX or t.pid in seen:
            raise ImageError(f"task pid {t.pid} out of range or repeated", record="TASK")
        if i and t.ppid not in seen:
            raise ImageError(f"task {t.pid} comes before its parent {t.ppid}", record="TASK")
        if not 0 <= t.exit_signal < 65:
            raise ImageError(f"task {t.pid} has exit signal {t.exit_signal}", record="TASK")
        seen.add(t.pid)
