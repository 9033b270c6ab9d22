"""Faulting in a file's pages from several threads (kernel/prefault.py), and
sizing it (engine/imagefile.py). No privilege needed: /dev/shm is writable
by anyone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptd.engine import imagefile
from ckptd.kernel import prefault

@pytest.fixture
def shm_file():
    path = Path(f"/dev/shm/ckptd-test-prefault-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    yield fd
    os.close(fd)
    path.unlink()


@pytest.mark.parametrize("threads", [1, 3])
def test_populate_allocates_and_keeps_contents(shm_file: int, threads: int) -> None:
    size = 40 << 20   # several steps, not a multiple of STEP per thread
    os.write(shm_file, b"head")
    os.ftruncate(shm_file, size)
    assert os.fstat(shm_file).st_blocks * 512 < 1 << 20
    prefault.populate(shm_file, 0, size, threads)
    assert os.fstat(shm_file).st_blocks * 512 >= size, "every page allocated"
    assert os.pread(shm_file, 4, 0) == b"head"
    assert os.pread(shm_file, 8, size - 8) == bytes(8)
    assert os.fstat(shm_file).st_size == size


def test_populate_from_an_unaligned_offset(shm_file: int) -> None:
    os.ftruncate(shm_file, 8 << 20)
    prefault.populate(shm_file, 100, (8 << 20) - 100, 2)
    assert os.fstat(shm_file).st_blocks * 512 >= 8 << 20


def test_fs_type(shm_file: int) -> None:
    assert prefault.fs_type(shm_file) == prefault.TMPFS_MAGIC
    with open("/proc/self/status", "rb") as f:
        assert prefault.fs_type(f.fileno()) == 0x9FA0   # PROC_SUPER_MAGIC
        assert prefault.fs_type(f.fileno()) not in prefault.LOCAL_FS


def test_populate_beyond_the_end_fails_cleanly(shm_file: int) -> None:
    os.ftruncate(shm_file, 1 << 20)
    with pytest.raises(OSError):
        prefault.populate(shm_file, 0, 8 << 20, 2)


def test_populate_reports_progress(shm_file: int) -> None:
    size = 5 * prefault.STEP + 4096
    os.ftruncate(shm_file, size)
    seen: list[int] = []
    m = prefault.FileMapping(shm_file, 0, size)
    try:
        m.populate(2, seen.append)
    finally:
        m.close()
    assert seen and seen == sorted(seen) and seen[-1] <= size
    assert all(0 < n for n in seen)


def test_tree_memory_counts_this_process_anonymous_memory() -> None:
    before = imagefile.tree_memory(os.getpid())
    block = bytearray(b"x") * (64 << 20)   # touched: resident
    after = imagefile.tree_memory(os.getpid())
    assert after - before >= 60 << 20
    del block


def test_kib() -> None:
    assert imagefile._kib("1024 kB") == 1 << 20
    assert imagefile._kib("") == imagefile._kib("12") == imagefile._kib("x kB") == 0
