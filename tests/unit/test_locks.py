"""File locks: fdinfo lines to image records, refusals, image checks, and
the calls a restore makes (flock/OFD at once, POSIX last)."""

from __future__ import annotations

import pytest

from ckptd.engine import locks
from ckptd.engine.inject import Batch
from ckptd.errors import ImageError, UnsupportedError
from ckptd.kernel import sysnr
from ckptd.v1 import image_pb2


def test_fdinfo_lines_become_locks() -> None:
    got = locks.parse(["1: FLOCK  ADVISORY  WRITE 42 fe:00:7 0 EOF",
                       "2: POSIX  ADVISORY  READ 42 fe:00:7 100 149",
                       "3: OFDLCK ADVISORY  READ -1 fe:00:7 5000 EOF"], 42, 3)
    assert [(lk.kind, lk.write, lk.start, lk.length) for lk in got] == [
        ("flock", True, 0, 0), ("posix", False, 100, 50), ("ofd", False, 5000, 0)]


@pytest.mark.parametrize("line", ["1: LEASE  ACTIVE    READ 42 fe:00:7 0 EOF",
                                  "1: DELEG  ACTIVE    WRITE 42 fe:00:7 0 EOF",
                                  "garbage"])
def test_leases_and_unreadable_lines_are_refused(line: str) -> None:
    with pytest.raises(UnsupportedError) as e:
        locks.parse([line], 42, 3)
    assert "fd 3" in str(e.value)


@pytest.mark.parametrize("lock", [image_pb2.FileLock(kind="lease"),
                                  image_pb2.FileLock(kind="flock", start=5),
                                  image_pb2.FileLock(kind="posix", length=1 << 63)])
def test_nonsense_locks_in_an_image_are_refused(lock: image_pb2.FileLock) -> None:
    with pytest.raises(ImageError):
        locks.check(image_pb2.Fd(fd=3, locks=[lock]))


def test_restore_takes_description_locks_now_and_posix_locks_later() -> None:
    f = image_pb2.Fd(fd=7, path="/x", locks=[
        image_pb2.FileLock(kind="flock", write=True),
        image_pb2.FileLock(kind="posix", start=100, length=50, write=True),
        image_pb2.FileLock(kind="ofd")])
    now, later = Batch(0x10000), Batch(0x10000)
    locks.restore(now, f)
    locks.restore_posix(later, image_pb2.Files(fds=[f]))
    assert [(c[0], c[1][:2]) for c in now.calls] == [
        (sysnr.FLOCK, (7, locks.LOCK_EX | locks.LOCK_NB)), (sysnr.FCNTL, (7, locks.F_OFD_SETLK))]
    assert [(c[0], c[1][:2]) for c in later.calls] == [(sysnr.FCNTL, (7, locks.F_SETLK))]
    assert "conflicting" in now.calls[0][3]
