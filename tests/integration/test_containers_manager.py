"""ContainerManager against the real kernel: namespaces, both freezers, kill,
exit statuses, ptys, uid drop, a daemon restart (recover), cleanup.

Needs root. Every test gets its own state_dir and cgroup root
(``ckptd-test-<random>``); the fixture SIGKILLs and deletes whatever is left,
removes the root cgroup from both hierarchies and fails if anything remains.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from harness import wait_for

from ckptd.containers.manager import FOUND_FROZEN_NOTE, ContainerManager
from ckptd.containers.model import ContainerInfo, Network, RunSpec, State
from ckptd.errors import AlreadyExistsError, NotFoundError, StateError, UsageError
from ckptd.kernel.namespaces import Namespace, ns_inode
from ckptd.kernel.process import set_child_subreaper

V1_MOUNT = Path("/sys/fs/cgroup/freezer")
V2_MOUNT = Path("/sys/fs/cgroup/unified")
BACKENDS = ["cgroup1", "cgroup2"]

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and cgroups"),
]


class Daemons:
    """Makes managers on one state_dir and cgroup root (a second one plays the
    daemon after a restart) and cleans up after all of them."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.root = f"ckptd-test-{secrets.token_hex(4)}"
        self.made: list[ContainerManager] = []

    def start(self, freezer: str = "auto") -> ContainerManager:
        manager = ContainerManager(self.state_dir, self.root, freezer=freezer)
        self.made.append(manager)
        return manager

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        # A fresh manager sees every record on disk, whichever manager made it.
        sweeper = ContainerManager(self.state_dir, self.root)
        try:
            for info in sweeper.recover():
                try:
                    sweeper.delete(info.id, force=True)
                except Exception as e:  # noqa: BLE001 - report every leftover, not just the first
                    problems.append(f"delete {info.id}: {e}")
        finally:
            sweeper.close()
            for manager in self.made:
                manager.close()
        leftovers = list((self.state_dir / "containers").iterdir())
        if leftovers:
            problems.append(f"container dirs left: {leftovers}")
        for mount in (V1_MOUNT, V2_MOUNT):
            root = mount / self.root
            if not root.exists():
                continue
            children = [p for p in root.iterdir() if p.is_dir()]
            if children:
                problems.append(f"cgroups left: {children}")
            else:
                root.rmdir()
        zombies = [p.pid for p in psutil.Process().children()
                   if p.status() == psutil.STATUS_ZOMBIE]
        if zombies:
            problems.append(f"unreaped children: {zombies}")
        return problems


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    made = Daemons(tmp_path / "state")
    yield made
    problems = made.cleanup()
    assert not problems, "cleanup: " + "; ".join(problems)


@pytest.fixture
def manager(daemons: Daemons) -> ContainerManager:
    return daemons.start()


def counter_loop(path: Path) -> tuple[str, ...]:
    # Traps TERM: the init of a PID namespace ignores signals it has no handler for.
    return ("sh", "-c", f"trap 'exit 143' TERM; i=0; while :; do i=$((i+1)); "
                        f"echo $i > {path}; sleep 0.01; done")


def read_counter(path: Path) -> int:
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text else 0


def wait_exited(manager: ContainerManager, ref: str) -> ContainerInfo:
    return wait_for(lambda: (i := manager.get(ref)).state == State.EXITED and i,
                    what=f"container {ref} to exit")


def assert_counter_grows(path: Path) -> None:
    start = read_counter(path)
    wait_for(lambda: read_counter(path) > start + 2, what="the counter to grow")


def assert_counter_stopped(path: Path, watch: float = 0.5) -> None:
    before = read_counter(path)
    time.sleep(watch)
    assert read_counter(path) == before


def cgroup_dirs(manager: ContainerManager) -> list[Path]:
    return [p for p in manager.cgroup_root_path.iterdir() if p.is_dir()]


# --- running -----------------------------------------------------------------

def test_run_puts_the_init_in_new_namespaces(manager: ContainerManager, tmp_path: Path):
    counter = tmp_path / "counter"
    script = (f"echo host=$(hostname) pid=$$; echo procs=$(ls /proc | grep -c '^[0-9]'); "
              f"{counter_loop(counter)[2]}")
    info = manager.run(RunSpec(argv=("sh", "-c", script), name="ns-test", hostname="box1"))
    assert info.state == State.RUNNING
    assert re.fullmatch(r"[0-9a-f]{12}", info.id)
    assert info.name == "ns-test" and info.hostname == "box1" and info.init_ns_pid == 1
    pid = info.init_pid
    for ns in (Namespace.PID, Namespace.UTS, Namespace.IPC, Namespace.MNT):
        assert ns_inode(pid, ns) != ns_inode("self", ns), ns
    assert ns_inode(pid, Namespace.NET) == ns_inode("self", Namespace.NET)   # host network
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(rf"^NSpid:\s+{pid}\s+1$", status, re.M)
    assert_counter_grows(counter)
    log = wait_for(lambda: "procs=" in (t := manager.log_path(info.id).read_text()) and t)
    assert "host=box1 pid=1" in log
    # Our own procfs: only the container's few processes, not the host's.
    assert 1 <= int(re.search(r"procs=(\d+)", log).group(1)) < 5
    cgroup = Path(info.cgroup_path)
    assert cgroup.parent == manager.cgroup_root_path
    assert pid in [int(x) for x in (cgroup / "cgroup.procs").read_text().split()]
    assert info.num_tasks >= 1 and info.rss_bytes > 0
    assert manager.get("ns-test").id == manager.get(info.id[:5]).id == info.id


def test_exit_code_is_recorded(manager: ContainerManager):
    info = manager.run(RunSpec(argv=("sh", "-c", "exit 7")))
    assert info.name == info.id and info.hostname == info.id
    done = wait_exited(manager, info.id)
    assert (done.exit_code, done.exit_signal) == (7, None)
    assert done.exited_at is not None and done.exited_at >= done.started_at
    assert done.num_tasks == 0
    with pytest.raises(StateError):
        manager.freeze(info.id)
    with pytest.raises(StateError):
        manager.kill(info.id, signal.SIGKILL)
    manager.delete(info.id)
    assert not Path(info.cgroup_path).exists()
    with pytest.raises(NotFoundError):
        manager.get(info.id)


@pytest.mark.parametrize("argv, cwd, message", [
    (("no-such-command-xyz",), "/", "command not found: no-such-command-xyz"),
    (("true",), "/no/such/dir", "cwd does not exist: /no/such/dir"),
])
def test_failed_start_leaves_nothing(manager: ContainerManager, argv, cwd, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        manager.run(RunSpec(argv=argv, cwd=cwd, name="doomed"))
    assert manager.list() == []
    assert list((manager.state_dir / "containers").iterdir()) == []
    assert cgroup_dirs(manager) == []
    # The name is free again.
    info = manager.run(RunSpec(argv=("true",), name="doomed"))
    wait_exited(manager, info.id)


def test_bad_specs_are_usage_errors(manager: ContainerManager):
    for spec in (RunSpec(argv=()), RunSpec(argv=("true",), name="bad name"),
                 RunSpec(argv=("true",), cwd="relative"),
                 RunSpec(argv=("true",), hostname="h" * 65),
                 RunSpec(argv=("true",), env=("NOEQUALS",))):
        with pytest.raises(UsageError):
            manager.run(spec)
    assert manager.list() == []


def test_new_network_has_only_loopback_up(manager: ContainerManager):
    info = manager.run(RunSpec(argv=("ip", "-o", "link", "show"), network=Network.NEW))
    wait_exited(manager, info.id)
    links = manager.log_path(info.id).read_text().strip().splitlines()
    assert len(links) == 1, links
    assert re.match(r"1: lo: <LOOPBACK,UP,LOWER_UP>", links[0]), links


def test_tty_is_the_controlling_terminal(manager: ContainerManager):
    info = manager.run(RunSpec(argv=("sh", "-c", "tty; test -t 0 && echo stdin-is-tty; "
                                     "echo TERM=$TERM; ps -o tty= -p $$"), tty=True))
    done = wait_exited(manager, info.id)
    assert done.exit_code == 0
    log = manager.log_path(info.id).read_text()
    assert re.search(r"^/dev/pts/\d+\r?$", log, re.M), log
    assert "stdin-is-tty" in log and "TERM=xterm" in log
    assert re.search(r"^pts/\d+\r?$", log, re.M), log   # its controlling terminal


def test_privileges_are_dropped(manager: ContainerManager):
    info = manager.run(RunSpec(argv=("sh", "-c", "id -u; id -g; id -G; echo $HOME"),
                               uid=65534, gid=65534))
    assert info.owner_uid == 65534
    wait_exited(manager, info.id)
    out = manager.log_path(info.id).read_text().split()
    assert out[:3] == ["65534", "65534", "65534"]
    assert out[3] == os.path.expanduser("~nobody")


def test_names_are_unique_and_refs_resolve(manager: ContainerManager):
    a = manager.run(RunSpec(argv=("sleep", "60"), name="web"))
    with pytest.raises(AlreadyExistsError):
        manager.run(RunSpec(argv=("sleep", "60"), name="web"))
    assert manager.get("web").id == a.id
    assert manager.get(a.id[:3]).id == a.id
    with pytest.raises(NotFoundError):
        manager.get("nope")
    with pytest.raises(NotFoundError):
        manager.get(a.id[:2])     # too short to be a prefix
    assert [i.id for i in manager.list()] == [a.id]


def test_concurrent_runs(manager: ContainerManager):
    infos: list[ContainerInfo] = []
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            infos.append(manager.run(RunSpec(argv=("sleep", "60"), name=f"c{n}")))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({i.id for i in infos}) == 4
    assert {i.state for i in manager.list()} == {State.RUNNING}


def test_delete_running_needs_force(manager: ContainerManager):
    info = manager.run(RunSpec(argv=("sh", "-c", "sleep 60 & sleep 60")))
    wait_for(lambda: manager.get(info.id).num_tasks == 3, what="3 tasks")
    with pytest.raises(StateError, match="is running; kill it first or use force"):
        manager.delete(info.id)
    manager.delete(info.id, force=True)
    assert not Path(info.cgroup_path).exists()
    assert not psutil.pid_exists(info.init_pid) or \
        psutil.Process(info.init_pid).create_time() > info.started_at + 1
    assert manager.list() == []


# --- both freezers -----------------------------------------------------------

def cgroup_frozen(manager: ContainerManager, info: ContainerInfo) -> bool:
    path = Path(info.cgroup_path)
    if manager.backend_name == "cgroup2":
        return "frozen 1" in (path / "cgroup.events").read_text()
    return (path / "freezer.state").read_text().strip() == "FROZEN"


@pytest.mark.parametrize("backend", BACKENDS)
def test_freeze_thaw_and_kill(daemons: Daemons, tmp_path: Path, backend: str):
    manager = daemons.start(backend)
    assert manager.backend_name == backend
    assert manager.cgroup_root_path == {"cgroup1": V1_MOUNT, "cgroup2": V2_MOUNT}[backend] / daemons.root
    counter = tmp_path / "counter"
    info = manager.run(RunSpec(argv=counter_loop(counter), name="loop"))
    assert_counter_grows(counter)

    frozen = manager.freeze("loop")
    assert frozen.state == State.FROZEN and cgroup_frozen(manager, frozen)
    with pytest.raises(StateError, match="already frozen"):
        manager.freeze("loop", timeout=1)
    assert manager.get("loop").state == State.FROZEN
    assert_counter_stopped(counter)
    assert manager.thaw("loop").state == State.RUNNING
    assert not cgroup_frozen(manager, info)
    with pytest.raises(StateError, match="is not frozen"):
        manager.thaw("loop")
    assert_counter_grows(counter)

    done = manager.kill("loop", signal.SIGTERM, timeout=5)
    assert done.state == State.EXITED
    assert (done.exit_code, done.exit_signal) == (143, None)       # the shell's trap
    with pytest.raises(StateError):
        manager.kill("loop")
    manager.delete("loop")
    assert not Path(info.cgroup_path).exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_reaches_a_frozen_container(daemons: Daemons, backend: str):
    manager = daemons.start(backend)
    info = manager.run(RunSpec(argv=("sh", "-c", "sleep 60 & sleep 60")))
    wait_for(lambda: manager.get(info.id).num_tasks == 3, what="3 tasks")
    manager.freeze(info.id)
    done = manager.kill(info.id, signal.SIGKILL)
    assert done.state == State.EXITED and done.exit_signal == signal.SIGKILL
    assert done.num_tasks == 0
    manager.delete(info.id)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_timeout_escalates_to_sigkill(daemons: Daemons, backend: str):
    manager = daemons.start(backend)
    info = manager.run(RunSpec(argv=("sleep", "60")))   # no handler: the init ignores SIGTERM
    began = time.monotonic()
    # Without a timeout nothing would happen: refused, saying what to do.
    with pytest.raises(StateError, match="no handler for SIGTERM.*timeout"):
        manager.kill(info.id, signal.SIGTERM)
    assert manager.get(info.id).state == State.RUNNING
    done = manager.kill(info.id, signal.SIGTERM, timeout=0.3)
    assert done.state == State.EXITED and done.exit_signal == signal.SIGKILL
    assert time.monotonic() - began < 3


# --- daemon restart ------------------------------------------------------------

def freeze_behind_the_daemons_back(backend: str, info: ContainerInfo) -> None:
    path = Path(info.cgroup_path)
    if backend == "cgroup2":
        (path / "cgroup.freeze").write_text("1")
        wait_for(lambda: "frozen 1" in (path / "cgroup.events").read_text())
    else:
        (path / "freezer.state").write_text("FROZEN")
        wait_for(lambda: (path / "freezer.state").read_text().strip() == "FROZEN")


@pytest.mark.parametrize("backend", BACKENDS)
def test_recover_after_a_daemon_restart(daemons: Daemons, tmp_path: Path, backend: str):
    first = daemons.start(backend)
    counter = tmp_path / "counter"
    running = first.run(RunSpec(argv=counter_loop(counter), name="running"))
    crashed = first.run(RunSpec(argv=("sleep", "60"), name="crash-frozen"))
    frozen = first.run(RunSpec(argv=("sleep", "60"), name="frozen"))
    first.run(RunSpec(argv=("sh", "-c", "exit 3"), name="ended"))
    first.freeze("frozen")
    freeze_behind_the_daemons_back(backend, crashed)   # as if a daemon died mid-freeze
    wait_exited(first, "ended")

    # The "restarted daemon": a second instance on the same state. (The first
    # is left open, unused, only because the shims it started are children of
    # this test process and its reaper must go on reaping them; after a real
    # restart they belong to a process that is gone.)
    second = daemons.start(backend)
    found = {i.name: i for i in second.recover()}
    assert set(found) == {"running", "crash-frozen", "frozen", "ended"}
    assert found["running"].state == State.RUNNING
    assert found["running"].init_pid == running.init_pid
    assert found["frozen"].state == State.FROZEN and found["frozen"].notes == ()
    assert found["crash-frozen"].state == State.FROZEN
    assert FOUND_FROZEN_NOTE in found["crash-frozen"].notes
    assert (found["ended"].state, found["ended"].exit_code) == (State.EXITED, 3)
    assert_counter_grows(counter)

    # Everything works through the new instance.
    assert second.thaw("crash-frozen").state == State.RUNNING
    assert second.thaw("frozen").state == State.RUNNING
    assert second.kill("running", signal.SIGTERM, timeout=5).exit_code == 143
    assert second.kill(crashed.id[:6], signal.SIGKILL).exit_signal == signal.SIGKILL
    second.freeze(frozen.id)
    with pytest.raises(AlreadyExistsError):
        second.run(RunSpec(argv=("true",), name="frozen"))
    second.delete("frozen", force=True)
    for name in ("running", "crash-frozen", "ended"):
        second.delete(name)
    assert second.list() == []
    assert cgroup_dirs(second) == []


def test_a_container_whose_shim_died_is_lost(daemons: Daemons):
    manager = daemons.start()
    # As the daemon does: when a shim dies first, its init becomes our child,
    # and the manager must reap it when it exits.
    set_child_subreaper(True)
    try:
        info = manager.run(RunSpec(argv=("sleep", "60"), name="orphan"))
        shim = psutil.Process(info.init_pid).parent()
        assert shim.ppid() == os.getpid()
        shim.kill()
        wait_for(lambda: psutil.Process(info.init_pid).ppid() == os.getpid(),
                 what="the init to be handed to us")
        assert manager.get("orphan").state == State.RUNNING      # the init lives on
        # Nobody is left to write exit.json.
        assert manager.kill("orphan", signal.SIGKILL).state == State.LOST
        wait_for(lambda: not psutil.pid_exists(info.init_pid), what="the init to be reaped")
    finally:
        set_child_subreaper(False)
    lost = manager.get("orphan")
    assert any("no exit status was recorded" in n for n in lost.notes)
    with pytest.raises(StateError):
        manager.kill("orphan")
    manager.delete("orphan")
    assert manager.list() == []
