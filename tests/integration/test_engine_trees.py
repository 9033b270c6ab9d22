"""Process trees: the 50-process ``tree`` workload checkpointed (killed) and
restored on the host through the in-process API and in a container through
the daemon, twice in a row there; every process must come back with its pid,
parent, process group and session, and the tree must then check itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import kill_and_reap, tree_pids, wait_for, wait_gone
from helpers import require_root
from workloads.workloads import Workload, build

from ckptd.engine import api

pytestmark = pytest.mark.root

TASKS = 50


def tree_ids(root: int) -> set[tuple[int, int, int, int]]:
    """(pid, ppid, pgid, sid) of every process under ``root``, all as seen in
    the tree's own PID namespace (ppid of the root: 0)."""
    ns_of: dict[int, int] = {}
    rows = []
    todo = [root]
    while todo:
        pid = todo.pop()
        with open(f"/proc/{pid}/status") as f:
            st = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        ns_of[pid] = int(st["NSpid"].split()[-1])
        rows.append((pid, int(st["PPid"]), int(st["NSpgid"].split()[-1]),
                     int(st["NSsid"].split()[-1])))
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                todo += [int(c) for c in f.read().split()]
    return {(ns_of[p], 0 if p == root else ns_of[pp], pg, s) for p, pp, pg, s in rows}


def procfs_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _still_there(root: int) -> list[int]:
    """The tree under ``root`` as it is now, for a cleanup that did not get
    to list it (the root itself if even that fails)."""
    try:
        return tree_pids(root)
    except OSError:
        return [root]


def _kill_tree(pid: int) -> None:
    try:
        os.kill(pid, 9)      # PR_SET_PDEATHSIG takes the rest
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _host_round(name: str, tmp_path: Path, request, tasks: int | None = None) -> None:
    """Run a tree workload on the host, checkpoint it (kill), restore it with
    the same pids, compare every (pid, ppid, pgid, sid), then let it verify."""
    require_root()
    with Workload.start(name, tmp_path / "wl") as w:
        w.wait_ready()
        before = tree_ids(w.pid)
        if tasks is not None:
            assert len(before) == tasks
        image = tmp_path / "image"
        with open(image, "wb") as f:
            api.checkpoint(w.pid, f, kill=True)
        w.reap()
        wait_gone([p for p, *_ in before])
        with open(image, "rb") as f:
            restored = api.restore(f)
        request.addfinalizer(lambda: _kill_tree(restored.pid))
        assert restored.pid == w.pid
        assert tree_ids(w.pid) == before
        w.go()
        assert w.result() == "PASS", w.output()


def test_tree_on_the_host(tmp_path: Path, request) -> None:
    _host_round("tree", tmp_path, request, tasks=TASKS)


def test_tree_in_a_container_twice(daemon, tmp_short: Path) -> None:
    """checkpoint -> restart -> checkpoint -> restart, the tree intact each time."""
    wdir = tmp_short / "tree"
    wdir.mkdir()
    with daemon.client() as c:
        ctr = c.run([str(build("tree")), str(wdir)], cwd=str(wdir))
        wait_for(lambda: (wdir / "ready").exists(), 20, "tree to be ready")
        before = tree_ids(ctr.init_pid)
        assert len(before) == TASKS
        ids = [ctr.id]
        for _ in range(2):
            image = b"".join(c.checkpoint(ids[-1]))
            new = c.restart(iter([image]))
            ids.append(new.id)
            assert tree_ids(new.init_pid) == before
        (wdir / "go").touch()
        result = wait_for(lambda: (wdir / "result").exists() and (wdir / "result").read_text(),
                          20, "tree to verify itself")
        assert result.strip() == "PASS", result + b"".join(c.logs(ids[-1])).decode()
        for x in reversed(ids):
            c.delete(x, force=True)


def test_zombies_on_the_host(tmp_path: Path, request) -> None:
    _host_round("zombie", tmp_path, request)


def test_zombies_in_a_container(daemon, tmp_short: Path) -> None:
    wdir = tmp_short / "zombie"
    wdir.mkdir()
    with daemon.client() as c:
        ctr = c.run([str(build("zombie")), str(wdir)], cwd=str(wdir))
        wait_for(lambda: (wdir / "ready").exists(), 20, "zombie to be ready")
        before = tree_ids(ctr.init_pid)
        new = c.restart(iter([b"".join(c.checkpoint(ctr.id))]))
        assert tree_ids(new.init_pid) == before
        (wdir / "go").touch()
        result = wait_for(lambda: (wdir / "result").exists() and (wdir / "result").read_text(),
                          20, "zombie to verify itself")
        assert result.strip() == "PASS", result + b"".join(c.logs(new.id)).decode()
        for x in (new.id, ctr.id):
            c.delete(x, force=True)


SHARING = r"""
import ctypes, mmap, os, sys, time
what, path = sys.argv[1], sys.argv[2]
if what == "memory":
    m = mmap.mmap(-1, 1 << 20)                  # MAP_SHARED | MAP_ANONYMOUS
    m[0] = 1
    fd = -1
else:
    f = open(path, "w+")                        # one description, one offset
    fd = f.fileno()
pid = os.fork()
if pid == 0:
    ctypes.CDLL(None).prctl(1, 9)               # PR_SET_PDEATHSIG: dies with its parent
    time.sleep(1000)
with open(path + ".ready.tmp", "w") as r:
    r.write(str(fd))
os.rename(path + ".ready.tmp", path + ".ready")   # whole, or not there
time.sleep(1000)
"""


def _shmem_inodes(pid: int) -> set[int]:
    with open(f"/proc/{pid}/maps") as f:
        return {os.stat(f"/proc/{pid}/map_files/{line.split()[0]}").st_ino for line in f
                if line.rstrip().endswith("/dev/zero (deleted)")}


@pytest.mark.parametrize("what", ["memory", "file"])
def test_sharing_between_processes_is_kept(what: str, tmp_path: Path, request) -> None:
    """Once refused, now restored shared: the parent and child map one shmem
    object, or hold one open file description (test_engine_sharing.py has
    the self-checking workload)."""
    require_root()
    import subprocess
    import sys
    from ckptd.kernel import task as task_mod
    path = tmp_path / "shared"
    # Its own session, as workloads: a child in a group outside the tree
    # (the test runner's) could not be put back in it.
    proc = subprocess.Popen([sys.executable, "-c", SHARING, what, str(path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    pids = [proc.pid]
    request.addfinalizer(lambda: [_kill_tree(p) for p in reversed(pids)] and proc.wait(5))
    wait_for(lambda: (tmp_path / "shared.ready").exists(), 10, "the tree to start")
    fd = int((tmp_path / "shared.ready").read_text())
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        pids.append(int(f.read().split()[0]))
    with open(tmp_path / "image", "wb") as f:
        api.checkpoint(proc.pid, f, kill=True)
    proc.wait(5)
    wait_gone(pids)
    with open(tmp_path / "image", "rb") as f:
        assert api.restore(f).pid == proc.pid
    assert [int(c) for c in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()] \
        == pids[1:]
    if what == "memory":
        shared = _shmem_inodes(pids[0])
        assert len(shared) == 1 and _shmem_inodes(pids[1]) == shared
    else:
        assert task_mod.same_file_across(pids[0], fd, pids[1], fd)


def test_a_taken_pid_is_named(tmp_path: Path) -> None:
    """Host trees need their pids free: a restore fails naming the one taken
    and leaves nothing behind."""
    require_root()
    from ckptd.errors import StateError
    from ckptd.kernel import task as task_mod
    with Workload.start("zombie", tmp_path / "wl") as w:
        ready = w.wait_ready()
        before = tree_ids(w.pid)
        with open(tmp_path / "image", "wb") as f:
            api.checkpoint(w.pid, f, kill=True)
        w.reap()
        wait_gone([p for p, *_ in before])
        taken = int(ready["waiter"])
        squatter = task_mod.spawn_with_pid(taken, "/bin/sleep", ["sleep", "100"])
        try:
            with open(tmp_path / "image", "rb") as f, pytest.raises(StateError) as e:
                api.restore(f)
            assert f"pid {taken} is taken" in str(e.value)
            assert not os.path.exists(f"/proc/{w.pid}")
        finally:
            os.kill(squatter, 9)
            os.waitpid(squatter, 0)


def test_tree_left_running(tmp_path: Path) -> None:
    """A checkpoint without kill lets every process of the tree go on untouched."""
    require_root()
    with Workload.start("tree", tmp_path / "wl") as w:
        w.wait_ready()
        before = tree_ids(w.pid)
        with open(tmp_path / "image", "wb") as f:
            api.checkpoint(w.pid, f, kill=False)
        assert tree_ids(w.pid) == before
        w.go()
        assert w.result() == "PASS", w.output()


IN_OUR_GROUP = r"""
import os, sys, time
pid = os.fork()
if pid == 0:
    if os.fork() == 0:           # a grandchild with a group of its own
        os.setpgid(0, 0)
        time.sleep(1000)
    time.sleep(1000)
while len(open(f"/proc/{pid}/task/{pid}/children").read().split()) < 1:
    time.sleep(0.01)
time.sleep(0.05)
open(sys.argv[1], "w").close()
time.sleep(1000)
"""


def test_a_tree_in_the_callers_process_group(tmp_path: Path) -> None:
    """A host tree started from a shell is in the shell's group: its root and
    the children that stayed in that group come back together in the group
    the restored root is in; a group made inside the tree comes back as it was."""
    require_root()
    import subprocess
    import sys
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", IN_OUR_GROUP, str(ready)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        wait_for(ready.exists, 10, "the tree to start")
        pids = tree_pids(proc.pid)       # none has a parent-death signal: all by pid
        before = tree_ids(proc.pid)
        assert len(before) == 3
        ours = os.getpgid(0)
        assert sum(1 for _, _, pgid, _ in before if pgid == ours) == 2
        with open(tmp_path / "image", "wb") as f:
            api.checkpoint(proc.pid, f, kill=True)
        proc.wait(10)
        wait_gone([p for p, *_ in before])
        with open(tmp_path / "image", "rb") as f:
            restored = api.restore(f)
        after = tree_ids(restored.pid)
        root_group = os.getpgid(restored.pid)
        expect = {(p, pp, root_group if g == ours else g, s) for p, pp, g, s in before}
        assert after == expect
    finally:
        for pid in reversed(pids or _still_there(proc.pid)):
            kill_and_reap(pid)
        proc.wait(5)


ORPHAN_UNDER_A_SUBREAPER = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
ready = sys.argv[1]
if os.fork() == 0:                      # P: a child subreaper inside the tree
    libc.prctl(36, 1, 0, 0, 0)          # PR_SET_CHILD_SUBREAPER
    leader = os.fork()
    if leader == 0:                     # L: leads a session, leaves an orphan in it
        os.setsid()
        if os.fork() == 0:              # M: ends up P's child, in L's session
            time.sleep(1000)
        os._exit(0)
    os.waitpid(leader, 0)
    open(ready, "w").close()
    while True:
        time.sleep(1000)
time.sleep(1000)
"""


def test_an_orphan_of_an_exited_session_under_a_subreaper_is_refused_at_checkpoint(
        tmp_path: Path) -> None:
    """A shape no restore can make (an exited session's orphan whose parent
    is not the tree's root) is refused by the checkpoint, before anything is
    written, not later by the restore; the tree runs on untouched."""
    require_root()
    import subprocess
    import sys
    from ckptd.errors import UnsupportedError
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_UNDER_A_SUBREAPER, str(ready)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    pids: list[int] = []
    try:
        wait_for(ready.exists, 10, "the tree to start")
        pids = tree_pids(proc.pid)
        assert len(pids) == 3
        image = tmp_path / "image"
        with open(image, "wb") as f, pytest.raises(UnsupportedError) as e:
            api.checkpoint(proc.pid, f, kill=True)
        assert "whose leader has exited" in str(e.value), e.value
        assert image.stat().st_size == 0
        assert tree_pids(proc.pid) == pids
        for pid in pids:
            with open(f"/proc/{pid}/status") as f:
                assert "TracerPid:\t0\n" in f.read()
    finally:
        for pid in reversed(pids or _still_there(proc.pid)):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        proc.wait(5)
