"""Processes that share an fd table (CLONE_FILES), cwd/root/umask (CLONE_FS),
an address space and signal handlers (CLONE_VM|CLONE_SIGHAND), and vfork
children caught before their exec: checkpointed (killed) and restored on
the host and in a container through the daemon; what was shared must be
one kernel object again (kcmp from outside), and the ``clone_flags``
workload then checks it from inside."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from harness import tree_pids, wait_for, wait_gone
from helpers import require_root
from workloads.workloads import Workload, build

from ckptd.engine import api, sharing_tables
from ckptd.errors import UnsupportedError
from ckptd.kernel import task as task_mod

pytestmark = pytest.mark.root


def sharing_view(root: int, info: dict[str, str]) -> dict[str, bool]:
    """What the workload's processes share, as kcmp sees it from outside
    (host pids from the ready file, which are the same after restore)."""
    a, b, c = int(info["a"]), int(info["b"]), int(info["c"])
    same = lambda x, y, kind: task_mod.kcmp(x, y, kind) == 0   # noqa: E731
    return {"files root-a": same(root, a, task_mod.KCMP_FILES),
            "fs root-b": same(root, b, task_mod.KCMP_FS),
            "vm root-c": same(root, c, task_mod.KCMP_VM),
            "sighand root-c": same(root, c, task_mod.KCMP_SIGHAND),
            "files root-b": same(root, b, task_mod.KCMP_FILES),
            "fs root-a": same(root, a, task_mod.KCMP_FS),
            "vm root-a": same(root, a, task_mod.KCMP_VM)}


WANT = {"files root-a": True, "fs root-b": True, "vm root-c": True, "sighand root-c": True,
        "files root-b": False, "fs root-a": False, "vm root-a": False}


def _kill_all(pids: list[int]) -> None:
    """By pid: the CLONE_VM child has no parent-death signal."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass    # gone already
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass    # not ours (the tree's own children): reaped by their parent


def test_clone_flags_on_the_host(tmp_path: Path, request) -> None:
    require_root()
    with Workload.start("clone_flags", tmp_path / "wl") as w:
        info = w.wait_ready()
        pids = tree_pids(w.pid)
        request.addfinalizer(lambda: _kill_all(pids))
        assert len(pids) == 6
        assert sharing_view(w.pid, info) == WANT
        image = tmp_path / "image"
        with open(image, "wb") as f:
            api.checkpoint(w.pid, f, kill=True)
        w.reap()
        wait_gone(pids)
        with open(image, "rb") as f:
            restored = api.restore(f)
        assert restored.pid == w.pid
        assert sorted(tree_pids(w.pid)) == sorted(pids)
        assert sharing_view(w.pid, info) == WANT
        w.go()
        assert w.result() == "PASS", w.output()


def test_clone_flags_in_a_container_twice(daemon, tmp_short: Path) -> None:
    wdir = tmp_short / "clone_flags"
    wdir.mkdir()
    with daemon.client() as c:
        ctr = c.run([str(build("clone_flags")), str(wdir)], cwd=str(wdir))
        ids = [ctr.id]
        try:
            wait_for(lambda: (wdir / "ready").exists(), 20, "clone_flags to be ready")
            before = len(tree_pids(ctr.init_pid))
            for _ in range(2):
                new = c.restart(iter([b"".join(c.checkpoint(ids[-1]))]))
                ids.append(new.id)
                assert len(tree_pids(new.init_pid)) == before
                root = new.init_pid
                kids = tree_pids(root)[1:]
                # In the container the ready file names namespace pids: find
                # the sharers by kcmp, one of each kind.
                assert sum(task_mod.kcmp(root, k, task_mod.KCMP_FILES) == 0 for k in kids) == 1
                assert sum(task_mod.kcmp(root, k, task_mod.KCMP_FS) == 0 for k in kids) == 1
                assert sum(task_mod.kcmp(root, k, task_mod.KCMP_VM) == 0 for k in kids) == 1
            (wdir / "go").touch()
            result = wait_for(lambda: (wdir / "result").exists()
                              and (wdir / "result").read_text(), 20,
                              "clone_flags to verify itself")
            assert result.strip() == "PASS", result + b"".join(c.logs(ids[-1])).decode()
        finally:
            for x in reversed(ids):
                c.delete(x, force=True)


def _vfork_started(w: Workload) -> int:
    """The workload's vfork child, its parent still waiting for it."""
    info = w.wait_ready()
    child = int(info["child"])
    assert sharing_tables.vfork_children(w.pid) == [child]
    return child


def test_a_vfork_child_runs_to_its_exec_then_the_tree_is_checkpointed(tmp_path: Path,
                                                                      request) -> None:
    require_root()
    with Workload.start("vfork", tmp_path / "wl", args=("exec",)) as w:
        child = _vfork_started(w)
        request.addfinalizer(lambda: _kill_all([child]))
        image = tmp_path / "image"
        started = time.monotonic()
        with open(image, "wb") as f:
            api.checkpoint(w.pid, f, kill=True)
        took = time.monotonic() - started
        w.reap()
        wait_gone([w.pid, child])
        with open(image, "rb") as f:
            restored = api.restore(f)
        assert restored.pid == w.pid
        # The child is `sleep` now, with an address space of its own.
        with open(f"/proc/{child}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[:2] == [b"sleep", b"1000"]
        assert task_mod.kcmp(w.pid, child, task_mod.KCMP_VM) != 0
        assert took < sharing_tables.VFORK_TIMEOUT
        w.go()
        assert w.result() == "PASS", w.output()


def test_a_vfork_child_that_never_execs_is_refused_and_left_running(tmp_path: Path,
                                                                    request) -> None:
    require_root()
    with Workload.start("vfork", tmp_path / "wl", args=("never",)) as w:
        child = _vfork_started(w)
        request.addfinalizer(lambda: _kill_all([child]))
        started = time.monotonic()
        with open(tmp_path / "image", "wb") as f, pytest.raises(UnsupportedError) as e:
            api.checkpoint(w.pid, f, kill=True)
        took = time.monotonic() - started
        assert f"pid {w.pid} is in vfork()" in str(e.value), e.value
        assert f"child {child}" in str(e.value), e.value
        assert took >= sharing_tables.VFORK_TIMEOUT
        for pid in (w.pid, child):
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
            assert "TracerPid:\t0" in status, status      # let go
        assert sharing_tables.vfork_children(w.pid) == [child]    # still in its vfork
        w.go()
        assert w.result() == "PASS", w.output()


def test_a_vfork_child_in_a_frozen_container(daemon, tmp_short: Path) -> None:
    """The daemon freezes the container first: the vfork child runs on to its
    exec once the rest is held under ptrace and the cgroup is thawed."""
    wdir = tmp_short / "vfork"
    wdir.mkdir()
    with daemon.client() as c:
        ctr = c.run([str(build("vfork")), str(wdir), "exec"], cwd=str(wdir))
        ids = [ctr.id]
        try:
            wait_for(lambda: (wdir / "ready").exists(), 20, "vfork to be ready")
            assert len(sharing_tables.vfork_children(ctr.init_pid)) == 1
            new = c.restart(iter([b"".join(c.checkpoint(ctr.id))]))
            ids.append(new.id)
            kids = tree_pids(new.init_pid)[1:]
            assert len(kids) == 1
            with open(f"/proc/{kids[0]}/cmdline", "rb") as f:
                assert f.read().split(b"\0")[:2] == [b"sleep", b"1000"]
            (wdir / "go").touch()
            result = wait_for(lambda: (wdir / "result").exists()
                              and (wdir / "result").read_text(), 20, "vfork to verify itself")
            assert result.strip() == "PASS", result + b"".join(c.logs(ids[-1])).decode()
        finally:
            for x in reversed(ids):
                c.delete(x, force=True)
