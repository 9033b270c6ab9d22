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


from ckptd.errors import ImageError
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
