"""Shared memory and shared file descriptions without privilege: validation
of the image fields (nonsense is an ImageError naming what is wrong), the
split of object data among VMAs, the COW count, fd planning for a taken
description."""

from __future__ import annotations

import pytest

from ckptd.engine import files, memory, shared
from ckptd.engine.files import FdTable
from ckptd.engine.inject import Batch
from ckptd.errors import ImageError
from ckptd.kernel import sysnr
from ckptd.v1 import image_pb2

SHM = sysnr.MAP_SHARED | sysnr.MAP_ANONYMOUS
PAGE = memory.PAGE


def _vma(start: int, end: int, vid: int = 1, flags: int = SHM, **kw) -> image_pb2.Vma:
    return image_pb2.Vma(id=vid, start=start, end=end, prot=3, flags=flags, **kw)


def _mm(*vmas: image_pb2.Vma) -> image_pb2.Mm:
    return image_pb2.Mm(vmas=list(vmas))


def test_a_valid_shared_vma_passes() -> None:
    memory.check_mm(_mm(_vma(0x10000, 0x12000, shmem_id=1, shmem_size=4 * PAGE,
                             pgoff=2 * PAGE)))
    memory.check_mm(_mm(_vma(0x10000, 0x12000)))   # an object of its own, offset 0


@pytest.mark.parametrize("vma,says", [
    (_vma(0x10000, 0x12000, flags=sysnr.MAP_PRIVATE | sysnr.MAP_ANONYMOUS, shmem_id=1,
          shmem_size=2 * PAGE), "is not MAP_SHARED|MAP_ANONYMOUS"),
    (_vma(0x10000, 0x12000, flags=sysnr.MAP_SHARED, path="/f", shmem_id=1,
          shmem_size=2 * PAGE), "is not MAP_SHARED|MAP_ANONYMOUS"),
    (_vma(0x10000, 0x12000, shmem_id=1, shmem_size=0), "of 0x0 bytes"),
    (_vma(0x10000, 0x12000, shmem_id=1, shmem_size=PAGE + 1), "of 0x1001 bytes"),
    (_vma(0x10000, 0x12000, shmem_id=1, shmem_size=1 << 48), "bytes"),
    (_vma(0x10000, 0x12000, shmem_id=1, shmem_size=2 * PAGE, pgoff=2 * PAGE),
     "at offset 0x2000"),
    (_vma(0x10000, 0x12000, shmem_size=2 * PAGE), "but no object"),
    (_vma(0x10000, 0x12000, pgoff=PAGE), "but no object"),
])
def test_nonsense_shared_memory_fields_are_image_errors(vma, says: str) -> None:
    with pytest.raises(ImageError, match="VMA 0x10000-0x12000") as e:
        memory.check_mm(_mm(vma))
    assert says in str(e.value)


def _proc(pid: int, vmas=(), fds=()) -> tuple[int, image_pb2.Mm, image_pb2.Files]:
    return pid, _mm(*vmas), image_pb2.Files(fds=list(fds), cwd="/", root="/")


def _fd(fd: int, **kw) -> image_pb2.Fd:
    return image_pb2.Fd(fd=fd, kind="file", path="/f", **kw)


def test_one_object_with_two_sizes_is_an_image_error() -> None:
    procs = [_proc(1, [_vma(0x10000, 0x12000, shmem_id=7, shmem_size=2 * PAGE)]),
             _proc(2, [_vma(0x10000, 0x12000, 2, shmem_id=7, shmem_size=4 * PAGE)])]
    with pytest.raises(ImageError, match="shared memory 7 16384 bytes, another VMA 8192"):
        shared.check_image(procs)


@pytest.mark.parametrize("procs,says", [
    ([_proc(1, fds=[_fd(3)]), _proc(2, fds=[_fd(3, shared_id=4)])],
     "task 2 fd 3 shares file description 4, which no earlier task opens"),
    ([_proc(1, fds=[_fd(3, shared_id=4)]), _proc(2, fds=[_fd(3, shared_id=4,
                                                             shared_owner=True)])],
     "task 1 fd 3 shares file description 4, which no earlier task opens"),
    ([_proc(1, fds=[_fd(3, shared_id=4, shared_owner=True)]),
      _proc(2, fds=[_fd(5, shared_id=4, shared_owner=True)])],
     "description 4 has two owners (tasks 1 and 2)"),
])
def test_a_description_nobody_opens_is_an_image_error(procs, says: str) -> None:
    with pytest.raises(ImageError) as e:
        shared.check_image(procs)
    assert says in str(e.value)


def test_shared_descriptions_in_order_pass() -> None:
    shared.check_image([_proc(1, fds=[_fd(3, shared_id=4, shared_owner=True)]),
                        _proc(2, fds=[_fd(3, shared_id=4), _fd(4, is_dup=True, dup_of=3)]),
                        _proc(3, fds=[_fd(9, shared_id=4)])])


@pytest.mark.parametrize("fds,says", [
    ([_fd(3, shared_owner=True)], "owns a shared file description without an id"),
    ([_fd(3), _fd(4, is_dup=True, dup_of=3, shared_id=2)], "both a dup and shared"),
    ([_fd(3, shared_id=2), _fd(4, shared_id=2)], "a shared file description twice"),
    ([_fd(3, deleted=True, shared_id=2, shared_owner=True)], "without its contents"),
])
def test_bad_shared_fd_fields_are_image_errors(fds, says: str) -> None:
    with pytest.raises(ImageError) as e:
        files.check_files(image_pb2.Files(fds=fds, cwd="/", root="/"), {})
    assert says in str(e.value)


def test_a_deleted_file_taken_from_its_owner_needs_no_contents() -> None:
    table = image_pb2.Files(fds=[_fd(3, deleted=True, shared_id=2)], cwd="/", root="/")
    files.check_files(table, {})
    assert files.prepare_deleted(table, {}) == {}


def test_object_data_goes_to_the_first_vma_that_maps_it() -> None:
    first = _vma(0x10000, 0x12000, 1, pgoff=2 * PAGE)     # object pages 2-3
    second = _vma(0x40000, 0x44000, 2, pgoff=0)           # object pages 0-3
    spans = shared._cover("src", 0, 6 * PAGE, [first, second])
    assert [(s.offset, s.length, s.vaddr, s.vma_id) for s in spans] == [
        (2 * PAGE, 2 * PAGE, 0x10000, 1),
        (0, 2 * PAGE, 0x40000, 2)]      # pages 4-5: mapped by nobody, dropped


def test_cow_count_is_what_earlier_processes_already_hold() -> None:
    assert shared.count_cow_shared([{1, 2, 3}, {2, 3, 4}, {3, 4, 5}, set()]) == 4 * PAGE
    assert shared.count_cow_shared([]) == 0


def _calls(b: Batch) -> list[tuple[int, tuple]]:
    return [(nr, args) for nr, args, _, _ in b.calls]


def test_a_taken_description_lands_on_its_number() -> None:
    # fds 0-2 in place, fd 3 wanted: pidfd lands on 3, the taken fd on 4.
    table = FdTable()
    table.used |= {0, 1, 2}
    b = Batch(0x1000)
    shared.take_fd(b, table, _fd(3, flags=files.O_CLOEXEC, shared_id=1), (17, 5))
    assert _calls(b) == [(sysnr.PIDFD_OPEN, (17, 0)), (sysnr.PIDFD_GETFD, (3, 5, 0)),
                         (sysnr.CLOSE, (3,)), (sysnr.DUP3, (4, 3, files.O_CLOEXEC)),
                         (sysnr.CLOSE, (4,))]
    assert table.used == {0, 1, 2, 3}


def test_a_taken_description_that_lands_right_keeps_or_drops_cloexec() -> None:
    # fd 0 in place, fd 2 wanted: pidfd lands on 1, the taken fd right on 2
    # (pidfd_getfd made it close-on-exec: the flag is set as the image says).
    table = FdTable()
    table.used |= {0}
    b = Batch(0x1000)
    shared.take_fd(b, table, _fd(2, shared_id=1), (17, 5))
    assert _calls(b) == [(sysnr.PIDFD_OPEN, (17, 0)), (sysnr.PIDFD_GETFD, (1, 5, 0)),
                         (sysnr.CLOSE, (1,)), (sysnr.FCNTL, (2, sysnr.F_SETFD, 0))]
    assert table.used == {0, 2}


def test_page_data_beyond_the_end_of_its_object_is_an_image_error() -> None:
    from ckptd.image.reader import PageRecord
    # The VMA reaches past its object (mremap can grow a mapping so): pages
    # there would grow the object if written.
    mm = _mm(_vma(0x10000, 0x14000, shmem_id=1, shmem_size=2 * PAGE, pgoff=PAGE))
    filler = memory.PageFiller(-1, 0, mm)
    try:
        rec = PageRecord(index=5, type=3, offset=100, length=0x2010, flags=0,
                         vaddr=0x11000, vma_id=1, data=memoryview(bytes(0x2000)))
        with pytest.raises(ImageError, match="beyond the end of shared memory 1"):
            filler.fill(rec)
    finally:
        filler.close()
