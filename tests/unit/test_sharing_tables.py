"""Image validation and the restore plan for processes that share an fd
table, fs info or an address space (ckptd/engine/sharing_tables.py): pure,
no privilege needed."""

from __future__ import annotations

import io

import pytest

from ckptd.engine import restore, sharing_tables
from ckptd.errors import ImageError, UnsupportedError
from ckptd.image import ImageReader, ImageWriter, new_header
from ckptd.image.registry import RecordType
from ckptd.kernel import sysnr
from ckptd.v1 import image_pb2


def task(pid: int, ppid: int = 0, **sharing: int) -> image_pb2.Task:
    return image_pb2.Task(pid=pid, ppid=ppid, exit_signal=17, **sharing)


def image(tasks: list[image_pb2.Task], fds: dict[int, int] | None = None) -> ImageReader:
    """An image holding ``tasks`` (each with empty MM and FILES, or ``fds``
    fds of its own), and no pages."""
    out = io.BytesIO()
    w = ImageWriter(out)
    w.write_header(new_header(container_id="", container_name="", pid=tasks[0].pid))
    w.write_message(RecordType.RECORD_TYPE_ORIGIN, image_pb2.Origin(kind="host"))
    for t in tasks:
        w.write_message(RecordType.RECORD_TYPE_TASK, t)
        w.write_message(RecordType.RECORD_TYPE_MM, image_pb2.Mm())
        files = image_pb2.Files(cwd="/", root="/")
        for n in range((fds or {}).get(t.pid, 0)):
            files.fds.append(image_pb2.Fd(fd=n, kind="dev", path="/dev/null"))
        w.write_message(RecordType.RECORD_TYPE_FILES, files)
    w.close()
    return ImageReader(io.BytesIO(out.getvalue()))


@pytest.mark.parametrize("field", sharing_tables.FIELDS)
def test_sharing_with_a_task_that_does_not_exist(field: str) -> None:
    with pytest.raises(ImageError, match="not a live task before it"):
        restore.read_tree(image([task(10), task(11, 10, **{field: 99})]))


def test_sharing_with_a_task_that_comes_later() -> None:
    with pytest.raises(ImageError, match="shares files of task 12, which is not a live task "
                                         "before it"):
        restore.read_tree(image([task(10), task(11, 10, files_of=12), task(12, 10)]))


def test_sharing_with_itself() -> None:
    with pytest.raises(ImageError, match="not a live task before it"):
        restore.read_tree(image([task(10), task(11, 10, fs_of=11)]))


def test_sharing_with_a_later_sharer_instead_of_the_first() -> None:
    with pytest.raises(ImageError, match="shares it with 10 in turn"):
        restore.read_tree(image([task(10), task(11, 10, vm_of=10),
                                 task(12, 10, vm_of=11)]))


def test_a_later_fd_table_sharer_with_fds_of_its_own() -> None:
    with pytest.raises(ImageError, match="records fds of its own"):
        restore.read_tree(image([task(10), task(11, 10, files_of=10)], fds={11: 1}))


def test_signal_handlers_shared_without_the_address_space() -> None:
    with pytest.raises(ImageError, match="not its address space"):
        restore.read_tree(image([task(10), task(11, 10, sighand_of=10)]))


def test_a_zombie_that_shares() -> None:
    z = task(11, 10, files_of=10)
    z.zombie = True
    out = io.BytesIO()
    w = ImageWriter(out)
    w.write_header(new_header(container_id="", container_name="", pid=10))
    w.write_message(RecordType.RECORD_TYPE_ORIGIN, image_pb2.Origin(kind="host"))
    w.write_message(RecordType.RECORD_TYPE_TASK, task(10))
    w.write_message(RecordType.RECORD_TYPE_MM, image_pb2.Mm())
    w.write_message(RecordType.RECORD_TYPE_FILES, image_pb2.Files(cwd="/", root="/"))
    w.write_message(RecordType.RECORD_TYPE_TASK, z)
    w.close()
    with pytest.raises(ImageError, match="zombie 11"):
        restore.read_tree(ImageReader(io.BytesIO(out.getvalue())))


def test_plan_clones_from_the_parent_when_it_shares() -> None:
    tasks = [task(10), task(11, 10, files_of=10, fs_of=10),
             task(12, 10, vm_of=10, sighand_of=10)]
    got = sharing_tables.plan(tasks, {11: 10, 12: 10})
    assert got == {11: sharing_tables.Clone(10, sysnr.CLONE_FILES | sysnr.CLONE_FS),
                   12: sharing_tables.Clone(10, sysnr.CLONE_VM | sysnr.CLONE_SIGHAND)}


def test_plan_clones_from_a_sibling_with_clone_parent() -> None:
    tasks = [task(10), task(11, 10), task(12, 10, files_of=11)]
    assert sharing_tables.plan(tasks, {11: 10, 12: 10}) == {
        12: sharing_tables.Clone(11, sysnr.CLONE_FILES | sharing_tables.CLONE_PARENT)}


def test_plan_refuses_a_sibling_with_another_exit_signal() -> None:
    other = task(11, 10)
    other.exit_signal = 0
    with pytest.raises(UnsupportedError, match="pid 12 shares an fd table"):
        sharing_tables.plan([task(10), other, task(12, 10, files_of=11)], {11: 10, 12: 10})


def test_plan_refuses_a_grandparent_table() -> None:
    tasks = [task(10), task(11, 10), task(12, 11, files_of=10)]
    with pytest.raises(UnsupportedError, match="neither its parent 11 nor a sibling"):
        sharing_tables.plan(tasks, {11: 10, 12: 11})
