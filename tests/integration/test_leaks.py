"""Leak detection on real processes: a --pid tree that shares an open file
description or shared memory with a process outside it is refused with a
report naming the resource and both holders, and keeps running untouched;
accepted by name (--external) it is checkpointed, restored and carries on
with a private copy. Containers get the same self-containment check: a file
passed in from outside is refused, the log shared with the shim is not.
Through the engine API, the daemon and ckptctl."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harness import Daemon, kill_and_reap, pid_gone, tree_pids, wait_for
from helpers import require, require_root

from ckptd.engine import api, leaks
from ckptd.errors import StateError, UsageError
from ckptd.kernel import task as task_mod
from ckptd.v1 import api_pb2 as pb

pytestmark = pytest.mark.root

# Holds the file description it inherited as fd FD, writes "child-" through
# it, then after DIR/go reports its offset and writes "after" at it.
FD_HOLDER = r"""
import os, sys, time
d, fd = sys.argv[1], int(sys.argv[2])
os.write(fd, b"child-")
open(d + "/ready", "w").close()
while not os.path.exists(d + "/go"):
    time.sleep(0.01)
pos = os.lseek(fd, 0, os.SEEK_CUR)
os.write(fd, b"after")
with open(d + "/result.tmp", "w") as f:
    f.write(f"PASS {pos}" if pos == 6 else f"FAIL: offset {pos}, expected 6")
os.rename(d + "/result.tmp", d + "/result")
while True:
    time.sleep(1)
"""

# The parent (outside the checkpointed tree) shares MAP_SHARED anonymous
# memory with its child (the tree). The child fills it with a pattern; after
# DIR/go it checks the pattern and that a write by the parent made after the
# restore does NOT show: a restored private copy.
SHM_PARENT = r"""
import mmap, os, signal, sys, time
d = sys.argv[1]
signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # children reap themselves
m = mmap.mmap(-1, 1 << 16)                       # MAP_SHARED | MAP_ANONYMOUS
pid = os.fork()
if pid == 0:
    m[:] = bytes(i % 251 for i in range(1 << 16))
    open(d + "/ready", "w").close()
    while not os.path.exists(d + "/go"):
        time.sleep(0.01)
    ok = m[:] == bytes(i % 251 for i in range(1 << 16))
    with open(d + "/result.tmp", "w") as f:
        f.write("PASS" if ok else f"FAIL: memory {m[:8]!r}")
    os.rename(d + "/result.tmp", d + "/result")
    while True:
        time.sleep(1)
with open(d + "/child.tmp", "w") as f:
    f.write(str(pid))
os.rename(d + "/child.tmp", d + "/child")
while not os.path.exists(d + "/scribble"):
    time.sleep(0.01)
m[:8] = b"PARENT!!"
open(d + "/scribbled", "w").close()
while True:
    time.sleep(1)
"""

# A container init that receives a file from outside over a unix socket,
# closes the socket and keeps the file, counting into DIR/count.
RECEIVER = r"""
import os, socket, sys, time
d = sys.argv[1]
s = socket.socket(socket.AF_UNIX)
s.connect(d + "/pass.sock")
_, fds, _, _ = socket.recv_fds(s, 16, 1)
s.close()
n = 0
while True:
    n += 1
    with open(d + "/count.tmp", "w") as f:
        f.write(f"{n} {fds[0]}")
    os.rename(d + "/count.tmp", d + "/count")
    time.sleep(0.01)
"""


def traced_or_stopped(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["TracerPid"]) != 0 or fields["State"].split()[0] in ("t", "T")


def wait_file(path: Path, timeout: float = 20) -> str:
    """The text of ``path`` once it exists (written aside and renamed: whole)."""
    wait_for(path.exists, timeout, f"{path}")
    return path.read_text()


def ckptctl(daemon: Daemon, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    # This tree's client (an installed ckptctl may be an older one).
    return subprocess.run([sys.executable, "-m", "ckptd_client.cli", "--address",
                           daemon.address, *args], capture_output=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[2])


@pytest.fixture
def fd_holder(tmp_path: Path, request):
    """A child holding one open file description with this test process
    (which keeps its own fd on it): (its Popen, our file, its dir)."""
    require_root()
    d = tmp_path / "holder"
    d.mkdir()
    shared = open(tmp_path / "shared.log", "w+b", buffering=0)
    request.addfinalizer(shared.close)
    fd = shared.fileno()
    proc = subprocess.Popen([sys.executable, "-c", FD_HOLDER, str(d), str(fd)], pass_fds=(fd,),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    request.addfinalizer(lambda: kill_and_reap(proc.pid))
    wait_file(d / "ready")
    assert os.lseek(fd, 0, os.SEEK_CUR) == 6, "one description: one offset"
    return proc, shared, d


def refusal(pid: int, **kwargs) -> StateError:
    with pytest.raises(StateError) as e:
        with open(os.devnull, "wb") as sink:
            api.checkpoint(pid, sink, **kwargs)
    return e.value


def restore_after_kill(proc: subprocess.Popen, image: Path, request) -> int:
    proc.wait(10)
    wait_for(lambda: pid_gone(proc.pid), 10, "the old pid to be free")
    with open(image, "rb") as f:
        restored = api.restore(f)
    request.addfinalizer(lambda: kill_and_reap(restored.pid))
    assert restored.pid == proc.pid
    return restored.pid


# -- open file descriptions, engine API --------------------------------------------------

def test_shared_file_refused_then_accepted(fd_holder, tmp_path: Path, request) -> None:
    proc, shared, d = fd_holder
    path = str(tmp_path / "shared.log")
    e = refusal(proc.pid)
    assert isinstance(e, leaks.LeakError)
    [leak] = e.leaks
    assert (leak.kind, leak.name) == ("file", f"file:{path}")
    assert leak.inside == (leaks.Holder(proc.pid, shared.fileno()),)
    assert leak.outside == (leaks.Holder(os.getpid(), shared.fileno()),)
    line = next(x for x in e.message.splitlines() if x.startswith("  file:"))
    assert f"pid {proc.pid} fd {shared.fileno()}" in line
    assert f"pid {os.getpid()} fd {shared.fileno()}" in line
    assert f"--external file:{path}" in e.message
    # Refused before anything changed: running, not traced, one offset still.
    assert not traced_or_stopped(proc.pid) and proc.poll() is None
    assert os.lseek(shared.fileno(), 0, os.SEEK_CUR) == 6

    image = tmp_path / "image"
    with open(image, "wb") as f:
        api.checkpoint(proc.pid, f, kill=True, externals=[f"file:{path}"])
    restore_after_kill(proc, image, request)
    # A private copy now: our writes move only our offset, not the restored one's.
    os.write(shared.fileno(), b"PARENT")
    (d / "go").touch()
    assert wait_file(d / "result").startswith("PASS"), (d / "result").read_text()
    assert Path(path).read_bytes() == b"child-afterT"


def test_external_name_matching_nothing_is_refused(fd_holder, tmp_path: Path) -> None:
    proc, shared, d = fd_holder
    path = tmp_path / "shared.log"
    with pytest.raises(UsageError) as e:
        with open(os.devnull, "wb") as sink:
            api.checkpoint(proc.pid, sink, externals=[f"file:{path}", "file:/tmp/no-such.log"])
    assert "file:/tmp/no-such.log" in e.value.message and "matches nothing" in e.value.message
    assert f"file:{path}" in e.value.message, "it says what the tree does share"
    with pytest.raises(UsageError, match="bad external resource name"):
        with open(os.devnull, "wb") as sink:
            api.checkpoint(proc.pid, sink, externals=["/tmp/shared.log"])
    assert not traced_or_stopped(proc.pid) and proc.poll() is None
    assert os.lseek(shared.fileno(), 0, os.SEEK_CUR) == 6


def test_private_file_is_not_a_leak(tmp_path: Path, request) -> None:
    """The same file opened separately outside (its own description) is no leak."""
    require_root()
    d = tmp_path / "holder"
    d.mkdir()
    path = tmp_path / "shared.log"
    with open(path, "w+b", buffering=0) as child_file:
        proc = subprocess.Popen([sys.executable, "-c", FD_HOLDER, str(d),
                                 str(child_file.fileno())], pass_fds=(child_file.fileno(),),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    request.addfinalizer(lambda: kill_and_reap(proc.pid))
    wait_file(d / "ready")
    with open(path, "rb") as ours:
        assert ours.read() == b"child-"
        with open(tmp_path / "image", "wb") as f:
            api.checkpoint(proc.pid, f, kill=False)
    assert not traced_or_stopped(proc.pid) and proc.poll() is None


# -- shared memory -----------------------------------------------------------------------

def test_shared_memory_with_parent_refused_then_copied(tmp_path: Path, request) -> None:
    require_root()
    d = tmp_path / "shm"
    d.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", SHM_PARENT, str(d)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    request.addfinalizer(lambda: kill_and_reap(parent.pid))
    child = int(wait_file(d / "child"))
    request.addfinalizer(lambda: kill_and_reap(child))
    wait_file(d / "ready")

    e = refusal(child)
    mem = [leak for leak in e.leaks if leak.kind == "mem"]
    assert len(mem) == 1 and [leak.kind for leak in e.leaks] == ["mem"], e.message
    [leak] = mem
    assert leak.what == "/dev/zero (deleted)"
    assert [h.pid for h in leak.inside] == [child] and leak.inside[0].address
    assert [h.pid for h in leak.outside] == [parent.pid]
    assert f"--external {leak.name}" in e.message
    assert not traced_or_stopped(child)

    image = tmp_path / "image"
    with open(image, "wb") as f:
        api.checkpoint(child, f, kill=True, externals=[leak.name])
    wait_for(lambda: pid_gone(child), 10, "the old child to be reaped by its parent")
    with open(image, "rb") as f:
        restored = api.restore(f)
    assert restored.pid == child
    # The parent writes into what used to be shared: the copy must not see it.
    (d / "scribble").touch()
    wait_file(d / "scribbled")
    (d / "go").touch()
    assert wait_file(d / "result") == "PASS"


# -- through the daemon and ckptctl ------------------------------------------------------

def test_pid_tree_through_ckptctl(daemon: Daemon, fd_holder, tmp_path: Path) -> None:
    proc, shared, d = fd_holder
    path = str(tmp_path / "shared.log")
    image = tmp_path / "tree.img"
    r = ckptctl(daemon, "checkpoint", "--pid", str(proc.pid), "-o", str(image))
    err = r.stderr.decode()
    assert r.returncode == 4, err + daemon.log()    # FAILED_PRECONDITION
    first, *report = err.splitlines()
    assert first.startswith(f"ckptctl: error: the tree of pid {proc.pid} shares 1 resource")
    [line] = [x for x in report if x.strip().startswith("file:")]
    assert path in line and f"pid {proc.pid} fd {shared.fileno()}" in line
    assert f"pid {os.getpid()} fd {shared.fileno()}" in line
    assert any(f"--external file:{path}" in x for x in report)
    assert "Traceback" not in err and not image.exists()
    assert not traced_or_stopped(proc.pid) and proc.poll() is None

    r = ckptctl(daemon, "checkpoint", "--pid", str(proc.pid), "-o", str(image),
                "--external", "file:/tmp/typo.log")
    assert r.returncode == 2 and b"matches nothing" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert proc.poll() is None

    r = ckptctl(daemon, "checkpoint", "--pid", str(proc.pid), "-o", str(image),
                "--external", f"file:{path}", "--leave-running")
    assert r.returncode == 0, r.stderr.decode() + daemon.log()
    assert image.stat().st_size > 0
    assert not traced_or_stopped(proc.pid) and proc.poll() is None
    (d / "go").touch()
    assert wait_file(d / "result").startswith("PASS")


def shim_shares_log(init_pid: int) -> bool:
    """The container's stdout and its shim's log fd are one description."""
    shim = int(Path(f"/proc/{init_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    log = os.readlink(f"/proc/{init_pid}/fd/1")
    for fd in os.listdir(f"/proc/{shim}/fd"):
        try:
            if os.readlink(f"/proc/{shim}/fd/{fd}") == log and \
                    task_mod.same_file_across(init_pid, 1, shim, int(fd)):
                return True
        except FileNotFoundError:
            continue
    return False


def test_container_sharing_its_log_with_the_shim_is_self_contained(
        daemon: Daemon, tmp_short: Path) -> None:
    counter = tmp_short / "count"
    with daemon.client() as c:
        ctr = c.run(["sh", "-c", f"while :; do echo tick; echo $$ > {counter}; sleep 0.05; done"])
        wait_for(counter.exists, 10, "the container to run")
        assert shim_shares_log(ctr.init_pid), "the case this test is about"
        image = b"".join(c.checkpoint(ctr.id, leave_running=True))
        assert image
        assert c.status(ctr.id).container.state == pb.CONTAINER_STATE_RUNNING
        c.delete(ctr.id, force=True)


def test_container_holding_a_file_from_outside_is_refused(
        daemon: Daemon, tmp_short: Path) -> None:
    """A host process hands an open file to the container over a unix socket
    and keeps it: the container is not self-contained."""
    shared_path = tmp_short / "handed.log"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_short / "pass.sock"))
    listener.listen(1)
    listener.settimeout(20)
    with listener, open(shared_path, "w+b", buffering=0) as shared, daemon.client() as c:
        ctr = c.run([sys.executable, "-c", RECEIVER, str(tmp_short)], cwd=str(tmp_short))
        conn, _ = listener.accept()
        with conn:
            socket.send_fds(conn, [b"f"], [shared.fileno()])
        count = tmp_short / "count"
        wait_for(count.exists, 20, "the container to take the file")
        their_fd = int(count.read_text().split()[1])

        from ckptd_client import errors
        with pytest.raises(errors.ClientError) as e:
            b"".join(c.checkpoint(ctr.id))
        assert e.value.code == "FAILED_PRECONDITION"
        message = e.value.message
        assert f"file:{shared_path}" in message
        assert f"pid {ctr.init_pid} fd {their_fd}" in message
        assert f"pid {os.getpid()} fd {shared.fileno()}" in message
        assert c.status(ctr.id).container.state == pb.CONTAINER_STATE_RUNNING
        before = int(count.read_text().split()[0])
        wait_for(lambda: int(count.read_text().split()[0]) > before, 10, "it to count on")

        # Accepted: checkpointed with a private copy, restarted, counting on.
        image = b"".join(c.checkpoint(ctr.id, external=[f"file:{shared_path}"]))
        new = c.restart(iter([image]))
        at = int(count.read_text().split()[0])
        wait_for(lambda: int(count.read_text().split()[0]) > at, 10, "the restart to count")
        assert os.readlink(f"/proc/{new.init_pid}/fd/{their_fd}") == str(shared_path)
        for x in (new.id, ctr.id):
            c.delete(x, force=True)


def test_container_entered_from_outside_is_refused(daemon: Daemon, tmp_short: Path) -> None:
    """A host process that entered the container's PID namespace (nsenter)
    is no part of its tree: it cannot be checkpointed, nor accepted."""
    nsenter = shutil.which("nsenter")
    require(nsenter is not None, "nsenter (util-linux)")
    with daemon.client() as c:
        ctr = c.run(["sleep", "1000"])
        intruder = subprocess.Popen([nsenter, "-t", str(ctr.init_pid), "--pid", "--",
                                     "sleep", "1000"], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        entered = 0
        try:
            inside = wait_for(lambda: Path(f"/proc/{intruder.pid}/task/{intruder.pid}/children")
                              .read_text().split(), 10, "nsenter to fork into the namespace")
            entered = int(inside[0])
            from ckptd_client import errors
            with pytest.raises(errors.ClientError) as e:
                b"".join(c.checkpoint(ctr.id))
            assert e.value.code == "FAILED_PRECONDITION"
            assert f"process:{entered}" in e.value.message
            assert "cannot be checkpointed with the tree" in e.value.message
            with pytest.raises(errors.ClientError) as e:
                b"".join(c.checkpoint(ctr.id, external=[f"process:{entered}"]))
            assert e.value.code == "INVALID_ARGUMENT" and "cannot be accepted" in e.value.message
            assert c.status(ctr.id).container.state == pb.CONTAINER_STATE_RUNNING
        finally:
            for pid in (entered, intruder.pid):
                if pid:
                    kill_and_reap(pid)
            c.delete(ctr.id, force=True)


# The parent (outside the tree) clones its child with CLONE_FS: one cwd,
# root and umask for both, which a restore would split.
FS_SHARER = r"""
import ctypes, os, signal, sys, time
d = sys.argv[1]
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
CLONE_FS, SYS_CLONE = 0x200, 56
pid = ctypes.CDLL(None, use_errno=True).syscall(SYS_CLONE, CLONE_FS | signal.SIGCHLD, 0, 0, 0, 0)
if pid == 0:
    while True:
        time.sleep(0.05)
with open(d + "/child.tmp", "w") as f:
    f.write(str(pid))
os.rename(d + "/child.tmp", d + "/child")
while True:
    time.sleep(1)
"""


def test_fs_info_shared_through_clone_is_refused(tmp_path: Path, request) -> None:
    require_root()
    parent = subprocess.Popen([sys.executable, "-c", FS_SHARER, str(tmp_path)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    request.addfinalizer(lambda: kill_and_reap(parent.pid))
    child = int(wait_file(tmp_path / "child"))
    request.addfinalizer(lambda: kill_and_reap(child))
    e = refusal(child)
    assert [(leak.name, leak.outside) for leak in e.leaks] == [
        (f"fs:{child}", (leaks.Holder(parent.pid),))], e.message
    assert "cwd/root/umask (CLONE_FS)" in e.message
    assert not traced_or_stopped(child)
    with open(tmp_path / "image", "wb") as f:
        api.checkpoint(child, f, externals=[f"fs:{child}"])   # accepted: resumed after
    assert not traced_or_stopped(child)


# -- tables shared through clone() with a process outside the subtree ---------------------

@pytest.mark.parametrize("who,kinds", [("a", {"fdtable"}), ("b", {"fs"}),
                                       ("c", {"vm", "sighand"})])
def test_a_subtree_sharing_a_table_with_its_parent_is_refused(who: str, kinds: set[str],
                                                              tmp_path: Path, request) -> None:
    """The clone_flags workload's A, B and C share their fd table, fs info,
    or memory and handlers with the root: checkpointing one of them alone
    (--pid) leaks that table, named after the subtree's process, with the
    root as the outside holder; the tree runs on untouched and still checks
    itself."""
    require_root()
    from workloads.workloads import Workload
    with Workload.start("clone_flags", tmp_path / "wl") as w:
        info = w.wait_ready()
        # By pid, also if the test fails: the CLONE_VM child has no
        # parent-death signal, and the others outlive a killed root.
        everyone = tree_pids(w.pid)
        request.addfinalizer(lambda: [kill_and_reap(p) for p in reversed(everyone)])
        pid = int(info[who])
        e = refusal(pid)
        assert isinstance(e, leaks.LeakError)
        tables = {leak.name for leak in e.leaks if leak.kind != "file"}
        assert tables == {f"{k}:{pid}" for k in kinds}, e.leaks
        # Each names the root as the outside holder (so do the files they
        # share since the fork: stdout, and all of A's fds, its table being
        # the root's).
        assert all(w.pid in {h.pid for h in leak.outside} for leak in e.leaks), e.leaks
        assert not traced_or_stopped(pid) and not traced_or_stopped(w.pid)
        w.go()
        assert w.result() == "PASS", w.output()
