"""Faulting in a tmpfs file's pages from several threads (kernel/prefault.py),
and reading smaps_rollup to size it. No privilege needed: /dev/shm is
writable by anyone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptd.kernel import prefault, proctask

ROLLUP = """\
55827d611000-7fffd39a9000 ---p 00000000 00:00 0                          [rollup]
Rss:                1776 kB
Pss_Shmem:             4 kB
Anonymous:           112 kB
Swap:                  0 kB
"""


def test_parse_smaps_rollup_in_bytes() -> None:
    got = proctask.parse_smaps_rollup(ROLLUP)
    assert got == {"Rss": 1776 << 10, "Pss_Shmem": 4 << 10, "Anonymous": 112 << 10, "Swap": 0}


def test_read_smaps_rollup_of_this_process() -> None:
    got = proctask.read_smaps_rollup(os.getpid())
    assert got["Rss"] > 0 and "Anonymous" in got


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
