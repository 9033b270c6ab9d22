"""Checkpoint of a process in a freezer cgroup (v2 and v1), and restore
into a stub someone else created (the container path: the daemon hands the
worker a stopped ckptd-stub)."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from harness import kill_and_reap
from helpers import require, require_root
from workloads.workloads import Workload, compare_views, outside_view

from ckptd import native
from ckptd.engine import api
from ckptd.kernel import freezer as freezer_mod

pytestmark = pytest.mark.root

MOUNTS = {"cgroup2": Path("/sys/fs/cgroup/unified"), "cgroup1": Path("/sys/fs/cgroup/freezer")}
IGNORE = ("stat.*", "status.SigQ", "status.voluntary*", "status.nonvoluntary*")


@pytest.fixture(params=["cgroup2", "cgroup1"])
def cgroup(request):
    require_root()
    kind = request.param
    mount = MOUNTS[kind]
    probe = "cgroup.controllers" if kind == "cgroup2" else "freezer.state"
    require((mount / probe).exists() or (mount / "tasks").exists(), f"a {kind} freezer")
    path = mount / f"ckptd-engine-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    fz = freezer_mod.make_freezer(kind, MOUNTS["cgroup1"], MOUNTS["cgroup2"])
    try:
        yield kind, path, fz
    finally:
        try:
            fz.kill_all(path)
            fz.wait_empty(path, 5)
        finally:
            fz.remove(path, 5)


def test_checkpoint_in_a_frozen_cgroup_resumes(cgroup, tmp_path: Path) -> None:
    kind, path, fz = cgroup
    with Workload.start("counter", tmp_path / "wl") as w:
        w.wait_ready()
        (path / "cgroup.procs").write_text(str(w.pid))
        before = outside_view(w.pid)
        with open(os.devnull, "wb") as sink:
            with api.checkpointed(w.pid, sink, cgroup=str(path), freezer=kind) as cp:
                assert cp.dumped.pages > 0
                count = w.count()
                time.sleep(0.1)
                assert w.count() == count          # stopped while we hold it
                cp.finish(kill=False)
        assert fz.state(path).value == "thawed"
        time.sleep(0.1)
        assert w.count() > count
        assert compare_views(before, outside_view(w.pid), IGNORE) == []
        w.go()
        assert w.result() == "PASS", w.output()


def test_restore_into_a_given_stub(tmp_path: Path) -> None:
    require_root()
    proc = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stub = subprocess.Popen([str(native.binary(native.STUB))])
    try:
        time.sleep(0.05)
        with open(tmp_path / "image", "wb") as f:
            api.checkpoint(proc.pid, f, kill=True,
                           source={"kind": "container", "container_id": "c1",
                                   "container_name": "one", "hostname": "box",
                                   "network": "new"})
        proc.wait(5)
        needs = []

        def give_stub(need):
            needs.append(need)
            return stub.pid

        with open(tmp_path / "image", "rb") as f:
            restored = api.restore(f, target="container", stub=give_stub)
        assert restored.pid == stub.pid
        # The hostname is what the task's UTS namespace says, not what it was told.
        assert needs[0]["source"]["container_id"] == "c1"
        assert needs[0]["hostname"] == os.uname().nodename
        assert needs[0]["pid"] == proc.pid and needs[0]["network"] == "new"
        time.sleep(0.05)
        assert Path(f"/proc/{stub.pid}/cmdline").read_bytes() == b"sleep\x001000\x00"
        assert os.readlink(f"/proc/{stub.pid}/exe").endswith("/sleep")
        with open(f"/proc/{stub.pid}/stat") as st:
            assert st.read().split(") ")[1][0] == "S"
    finally:
        for p in (proc, stub):
            if p.poll() is None:
                p.kill()
            p.wait(5)


def test_threads_in_a_frozen_cgroup(cgroup, tmp_path: Path, request) -> None:
    """Every thread of a frozen process is seized at once (the set of threads
    cannot change while frozen); killed through the cgroup and restored."""
    kind, path, fz = cgroup
    with Workload.start("threads", tmp_path / "wl") as w:
        info = w.wait_ready()
        (path / "cgroup.procs").write_text(str(w.pid))
        image = tmp_path / "image"
        with open(image, "wb") as sink:
            api.checkpoint(w.pid, sink, kill=True, cgroup=str(path), freezer=kind)
        w.reap()
        with open(image, "rb") as f:
            restored = api.restore(f)
        request.addfinalizer(lambda: kill_and_reap(restored.pid))
        tids = sorted(int(t) for t in os.listdir(f"/proc/{w.pid}/task"))
        assert tids == sorted(int(t) for t in info["tids"].split(","))
        w.go()
        assert w.result() == "PASS", w.output()
