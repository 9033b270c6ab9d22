"""The process tree: who is whose child, in which group and session.

Dump: each task's pid, real parent (ppid: an orphan's is the init it was
reparented to, not its creator), process group, session and exit signal,
all in the tree's PID namespace. What processes share comes back shared:
fd tables, fs info and address spaces (sharing_tables.py), anonymous
MAP_SHARED memory and open file descriptions (shared.py); what they share
with processes outside the tree is refused unless accepted (leaks.py).

Restore: ``order`` lists the tasks parents first; each parent clones its
children itself (restore.py), so the tree's shape and pids come back with it.
"""

from __future__ import annotations


from ckptd.errors import ImageError, UnsupportedError
from ckptd.kernel import procfs
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


def session_cloners(tasks: list[image_pb2.Task]) -> tuple[dict[int, int], list[int]]:
    """Who clones each task at restore (pid -> pid, in the tree's namespace),
    and the sessions whose exited leader a helper must stand in for.

    A task is cloned by its parent, except an orphan in a session whose
    leader has exited: that session can only be entered at birth from a
    task with the session's pid, so a helper with that pid (cloned by the
    root) clones it, and the orphan is the root's again once the helper
    exits — which needs the root to be the namespace's init or a child
    subreaper. Anything else is refused (at checkpoint as at restore)."""
    root = tasks[0]
    pids = {t.pid for t in tasks}
    by_pid = {t.pid: t for t in tasks}
    cloner = {t.pid: t.ppid for t in tasks[1:]}
    helpers: list[int] = []
    for t in tasks[1:]:
        if t.sid in pids or t.sid == root.sid or by_pid[t.ppid].sid == t.sid:
            continue
        if t.ppid != root.pid or not (root.pid == 1 or root.child_subreaper):
            raise UnsupportedError(f"pid {t.pid} is in session {t.sid}, whose leader has "
                                   f"exited, under parent {t.ppid} that is not the tree's "
                                   "reaper: not supported yet", pid=t.pid, kind="session")
        if t.sid not in cloner:
            helpers.append(t.sid)
            cloner[t.sid] = root.pid
        cloner[t.pid] = t.sid
    return cloner, helpers


def session_helper(sid: int, root: image_pb2.Task) -> image_pb2.Task:
    """The task standing in for session ``sid``'s exited leader."""
    return image_pb2.Task(pid=sid, ppid=root.pid, sid=sid, pgid=sid, session_leader=True)
