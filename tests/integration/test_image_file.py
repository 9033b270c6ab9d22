"""The image file readied before the freeze (ckptd/engine/imagefile.py): a
read-write file on a local file system is sized and faulted in while the
tree runs, then cut back to exactly the image, also when the dump fails;
other files are written as they come. The prepared image restores a
process that checks every one of its pages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import RESTORE_VIEW_IGNORE, kill_and_reap, tree_pids, wait_for, wait_gone
from helpers import require_root
from workloads.workloads import Workload, compare_views, outside_view

from ckptd import errors
from ckptd.engine import api, imagefile, memory
from ckptd.image import ImageReader
from ckptd.kernel import prefault

pytestmark = pytest.mark.root

MIB = 96          # above imagefile.MIN_PREFAULT
PREPARING = "preparing the image file"


@pytest.fixture
def shm_image():
    path = Path(f"/dev/shm/ckptd-test-image-{os.getpid()}")
    yield path
    path.unlink(missing_ok=True)


def _open(path: Path, flags: int = os.O_RDWR):
    return os.fdopen(os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def test_prepared_tmpfs_image_is_exact_and_restores(tmp_path: Path, shm_image: Path,
                                                      request) -> None:
    require_root()
    phases: list[tuple[str, int]] = []
    with Workload.start("mem1g", tmp_path / "wl", args=(str(MIB),)) as w:
        w.wait_ready()
        with _open(shm_image) as f:
            dumped = api.checkpoint(w.pid, f, kill=True,
                                    progress=lambda phase, done, total: phases.append((phase, total)))
        assert phases[0][0] == PREPARING
        assert phases[0][1] >= MIB << 20, "sized for the tree's memory"
        # Cut back to the image: nothing of the prepared size is left after it.
        assert shm_image.stat().st_size == dumped.bytes
        with open(shm_image, "rb") as f:
            ImageReader(f).verify()
        w.reap()
        with open(shm_image, "rb") as f:
            restored = api.restore(f)
        request.addfinalizer(lambda: kill_and_reap(restored.pid))
        w.go()
        assert w.result() == "PASS", w.output()


def test_refused_dump_leaves_the_prepared_file_empty(tmp_path: Path, shm_image: Path) -> None:
    require_root()
    # Enough memory to be prepared for, and a socket the engine refuses.
    ready = tmp_path / "ready"
    code = (f"import socket, sys, time; b = bytearray(b'x') * ({MIB} << 20); "
            "s = socket.socket(); open(sys.argv[1], 'w').close(); time.sleep(1000)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ready)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)
    try:
        wait_for(ready.exists, 30, "the socket holder to be ready")
        phases: list[str] = []
        with _open(shm_image) as f:
            with pytest.raises(errors.CkptdError, match="socket"):
                api.checkpoint(proc.pid, f, kill=True,
                               progress=lambda phase, done, total: phases.append(phase))
        assert phases[0] == PREPARING
        assert shm_image.stat().st_size == 0, "the prepared size is cut back on failure"
        assert proc.poll() is None, "a refused checkpoint leaves the process running"
    finally:
        kill_and_reap(proc.pid)


def test_write_only_file_is_not_prepared(tmp_path: Path, shm_image: Path, request) -> None:
    require_root()
    phases: list[str] = []
    with Workload.start("mem1g", tmp_path / "wl", args=(str(MIB),)) as w:
        w.wait_ready()
        with _open(shm_image, os.O_WRONLY) as f:
            dumped = api.checkpoint(w.pid, f, kill=False,
                                    progress=lambda phase, done, total: phases.append(phase))
        assert PREPARING not in phases
        assert shm_image.stat().st_size == dumped.bytes
        w.go()
        assert w.result() == "PASS", w.output()


def test_only_fresh_read_write_local_files_of_large_trees_are_prepared(
        tmp_path: Path, shm_image: Path, request) -> None:
    require_root()
    with Workload.start("mem1g", tmp_path / "wl", args=(str(MIB),)) as w:
        w.wait_ready()
        assert imagefile.tree_memory(w.pid) >= MIB << 20
        # Not a regular file: a pipe streams.
        r, wr = os.pipe()
        request.addfinalizer(lambda: (os.close(r), os.close(wr)))
        with os.fdopen(os.dup(wr), "wb") as f:
            assert imagefile.prepare(f, w.pid) is None
        with _open(shm_image, os.O_RDWR | os.O_APPEND) as f:
            assert imagefile.prepare(f, w.pid) is None
        shm_image.unlink()
        with _open(shm_image) as f:
            f.write(b"kept")
            f.flush()
            os.lseek(f.fileno(), 0, os.SEEK_SET)   # bytes past the position: not ours to size
            assert imagefile.prepare(f, w.pid) is None
        assert shm_image.read_bytes() == b"kept"
        # A disk file system's page cache is prepared as tmpfs is.
        disk = tmp_path / "on-disk"
        with _open(disk) as f:
            if prefault.fs_type(f.fileno()) in prefault.LOCAL_FS:
                prepared = imagefile.prepare(f, w.pid)
                assert prepared is not None and disk.stat().st_size >= MIB << 20
                prepared.sink.write(b"image")
                prepared.trim()
                prepared.close()
                assert disk.read_bytes() == b"image"
                assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == 5
        w.go()
        assert w.result() == "PASS", w.output()
    proc = subprocess.Popen(["sleep", "1000"])
    try:
        wait_for(lambda: Path(f"/proc/{proc.pid}/exe").exists(), 5, "sleep started")
        assert imagefile.tree_memory(proc.pid) < imagefile.MIN_PREFAULT
        shm_image.unlink()
        with _open(shm_image) as f:
            assert imagefile.prepare(f, proc.pid) is None
        assert shm_image.stat().st_size == 0
    finally:
        kill_and_reap(proc.pid)


@pytest.mark.parametrize("name", ["memory", "sharing"])
def test_small_workloads_through_a_prepared_file(name: str, tmp_path: Path, shm_image: Path,
                                                  request, monkeypatch) -> None:
    """Every kind of memory (PROT_NONE and read-only pages read through
    /proc/PID/mem, shared objects, file-backed private pages) read in place
    into the prepared mapping restores as well as through a plain file."""
    require_root()
    monkeypatch.setattr(imagefile, "MIN_PREFAULT", 0)   # prepare even a small tree
    phases: list[str] = []
    with Workload.start(name, tmp_path / "wl") as w:
        w.wait_ready()
        pids = tree_pids(w.pid)
        views = [outside_view(p) for p in pids]
        with _open(shm_image) as f:
            dumped = api.checkpoint(w.pid, f, kill=True,
                                    progress=lambda phase, done, total: phases.append(phase))
        assert phases[0] == PREPARING
        assert shm_image.stat().st_size == dumped.bytes
        w.reap()
        wait_gone(pids)
        with open(shm_image, "rb") as f:
            restored = api.restore(f)
        request.addfinalizer(lambda: kill_and_reap(restored.pid))
        assert tree_pids(w.pid) == pids
        for pid, before in zip(pids, views):
            assert compare_views(before, outside_view(pid), RESTORE_VIEW_IGNORE) == [], pid
        w.go()
        assert w.result() == "PASS", w.output()


def test_read_pages_fills_scattered_views_across_an_unreadable_page() -> None:
    """process_vm_readv stops at a PROT_NONE page; the rest of that view and
    every later one come from /proc/PID/mem, each byte at its address."""
    require_root()
    import mmap as mmap_mod
    page = mmap_mod.PAGESIZE
    code = ("import ctypes, mmap, sys, time\n"
            f"m = mmap.mmap(-1, 3 * {page})\n"
            f"for i in range(3): m[i * {page}:(i + 1) * {page}] = bytes([65 + i]) * {page}\n"
            "a = ctypes.addressof(ctypes.c_char.from_buffer(m))\n"
            f"assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(a + {page}), {page}, 0) == 0\n"
            "print(a, flush=True)\n"
            "time.sleep(1000)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        addr = int(proc.stdout.readline())
        buf = bytearray(3 * page)
        view = memoryview(buf)
        cuts = [view[:page // 2], view[page // 2:page + 100], view[page + 100:]]
        memfd = memory._read_pages(proc.pid, addr, cuts, True, -1)
        try:
            assert memfd >= 0, "the unreadable page was read through /proc/PID/mem"
        finally:
            os.close(memfd)
        assert buf == b"A" * page + b"B" * page + b"C" * page
    finally:
        kill_and_reap(proc.pid)


def test_a_file_that_cannot_grow_is_written_as_it_comes(tmp_path: Path, request) -> None:
    """A memfd sealed against growing (tmpfs, read-write, empty): preparing
    it fails, quietly; the dump writes it the ordinary way, and fails only
    because the image cannot grow either, leaving the tree running."""
    require_root()
    import fcntl
    fd = os.memfd_create("sealed-image", os.MFD_ALLOW_SEALING)
    request.addfinalizer(lambda: os.close(fd))
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
    with Workload.start("mem1g", tmp_path / "wl", args=(str(MIB),)) as w:
        w.wait_ready()
        sink = os.fdopen(os.dup(fd), "wb")
        assert imagefile.prepare(sink, w.pid) is None
        with pytest.raises(PermissionError):   # the sink's own error, as it came
            api.checkpoint(w.pid, sink, kill=True)
        with pytest.raises(PermissionError):
            sink.close()   # what it still buffers cannot be written either
        assert os.fstat(fd).st_size == 0
        w.go()
        assert w.result() == "PASS", w.output()
