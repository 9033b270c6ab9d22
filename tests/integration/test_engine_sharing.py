"""Memory and open file descriptions shared across fork (the ``sharing``
workload: a parent, its child and grandchild) come back shared: one shmem
object per object, one open file description per description, on the host
through the in-process API and in a container through the daemon, twice in
a row. The image stores each shared page once; the dump reports the private
pages still COW-shared between the processes."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from harness import RESTORE_VIEW_IGNORE, kill_and_reap, tree_pids, wait_for, wait_gone
from helpers import require_root
from workloads.workloads import Workload, build, compare_views, outside_view

from ckptd.engine import api
from ckptd.engine import restore as restore_mod
from ckptd.image import ImageReader, PageRecord
from ckptd.kernel import task as task_mod

pytestmark = pytest.mark.root

PAGE = 4096
# What sharing.c touches in its shared objects before ready: big: the
# parent's 512 pages, the child's 512 and the flags page; part: 256 + 256;
# split: 64 + 190. Each must be stored exactly once.
SHARED_PAGES = (512 + 512 + 1) + (256 + 256) + (64 + 190)
# priv (2 MiB) is the same physical memory in the child and the grandchild
# as in the parent: at least twice 2 MiB stored again.
COW_AT_LEAST = 2 * (2 << 20)
FDS = (3, 4, 5, 6, 7)  # shared.dat, append.log, /dev/null, gone.dat (deleted), DIR


def shmem_objects(pid: int) -> list[tuple[int, int]]:
    """(dev, ino) of each MAP_SHARED|MAP_ANONYMOUS mapping of ``pid``, in address order."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if line.rstrip().endswith("/dev/zero (deleted)") and line.split()[1][3] == "s":
                st = os.stat(f"/proc/{pid}/map_files/{line.split()[0]}")
                out.append((st.st_dev, st.st_ino))
    return out


def assert_shared_again(pids: list[int]) -> None:
    """Seen from outside: every process maps the same objects, and holds the
    same open file descriptions, as its parent."""
    objects = shmem_objects(pids[0])
    assert len(objects) == 4 and len(set(objects)) == 3, objects   # split is two VMAs
    for pid in pids[1:]:
        assert shmem_objects(pid) == objects, f"pid {pid} maps other objects"
        for fd in FDS:
            assert task_mod.same_file_across(pids[0], fd, pid, fd), f"pid {pid} fd {fd}"


def stored_shared_bytes(image: Path) -> int:
    """Page bytes the image holds for shared anonymous memory, checking that
    no offset of an object is stored twice."""
    with open(image, "rb") as f:
        reader = ImageReader(f)
        procs, records, first = restore_mod.read_tree(reader)
        vmas = {v.id: v for m in procs for v in m.mm.vmas}
        stored: dict[int, list[tuple[int, int]]] = {}
        for rec in itertools.chain([first] if first else [], records):
            if not isinstance(rec, PageRecord):
                continue
            v = vmas[rec.vma_id]
            if v.shmem_id:
                lo = v.pgoff + rec.vaddr - v.start
                stored.setdefault(v.shmem_id, []).append((lo, lo + rec.data.nbytes))
    total = 0
    for sid, ranges in stored.items():
        ranges.sort()
        for (a_lo, a_hi), (b_lo, _) in zip(ranges, ranges[1:]):
            assert a_hi <= b_lo, f"object {sid}: bytes {b_lo:#x}-{a_hi:#x} stored twice"
        total += sum(hi - lo for lo, hi in ranges)
    return total


def test_sharing_on_the_host(tmp_path: Path, request) -> None:
    require_root()
    with Workload.start("sharing", tmp_path / "wl") as w:
        w.wait_ready()
        pids = tree_pids(w.pid)
        assert len(pids) == 3
        views = [outside_view(p) for p in pids]
        image = tmp_path / "image"
        with open(image, "wb") as f:
            dumped = api.checkpoint(w.pid, f, kill=True)
        assert dumped.cow_shared_bytes >= COW_AT_LEAST, dumped
        assert dumped.cow_shared_bytes < dumped.pages * PAGE, dumped
        assert stored_shared_bytes(image) == SHARED_PAGES * PAGE
        w.reap()
        wait_gone(pids)
        with open(image, "rb") as f:
            restored = api.restore(f)
        request.addfinalizer(lambda: kill_and_reap(restored.pid))
        assert restored.pid == w.pid and tree_pids(w.pid) == pids
        for pid, before in zip(pids, views):
            assert compare_views(before, outside_view(pid), RESTORE_VIEW_IGNORE) == [], pid
        assert_shared_again(pids)
        w.go()
        assert w.result() == "PASS", w.output()


def test_sharing_left_running(tmp_path: Path) -> None:
    """A checkpoint that resumes the tree leaves the sharing as it was."""
    require_root()
    with Workload.start("sharing", tmp_path / "wl") as w:
        w.wait_ready()
        pids = tree_pids(w.pid)
        with open(tmp_path / "image", "wb") as f:
            api.checkpoint(w.pid, f, kill=False)
        assert_shared_again(pids)
        w.go()
        assert w.result() == "PASS", w.output()


def test_sharing_in_a_container_twice(daemon, tmp_short: Path) -> None:
    """checkpoint -> restart -> checkpoint -> restart: the second checkpoint
    reads objects and descriptions that the first restore made."""
    wdir = tmp_short / "sharing"
    wdir.mkdir()
    with daemon.client() as c:
        ctr = c.run([str(build("sharing")), str(wdir)], cwd=str(wdir))
        ids = [ctr.id]
        try:
            wait_for(lambda: (wdir / "ready").exists(), 20, "sharing to be ready")
            for _ in range(2):
                image = b"".join(c.checkpoint(ids[-1]))
                new = c.restart(iter([image]))
                ids.append(new.id)
                pids = tree_pids(new.init_pid)
                assert len(pids) == 3
                assert_shared_again(pids)
            done = daemon.events("checkpoint_done")
            # Forked, the tree shares copy-on-write pages; restored, each
            # process has its own copies, so the second checkpoint finds none.
            assert [(e["tasks"], e["cow_shared_bytes"] > 0) for e in done] == [(3, True),
                                                                             (3, False)]
            (wdir / "go").touch()
            result = wait_for(lambda: (wdir / "result").exists()
                              and (wdir / "result").read_text(), 20,
                              "sharing to verify itself")
            assert result.strip() == "PASS", result + b"".join(c.logs(ids[-1])).decode()
        finally:
            for x in reversed(ids):
                c.delete(x, force=True)
