"""Engine pieces that need no privilege: /proc parsers on captured text,
register fixups, batch encoding, fd number planning, image validation."""

from __future__ import annotations

import os
import struct

import pytest

from ckptd import errors, native
from ckptd.engine import inject, memory, regs
from ckptd.engine.files import FdTable
from ckptd.engine.worker import error_report
from ckptd.kernel import proctask, ptrace, sysnr
from ckptd.v1 import image_pb2

SMAPS = """\
55e3965f1000-55e3965f3000 r--p 00000000 fe:00 260875                     /usr/bin/sleep
Size:                  8 kB
VmFlags: rd mr mw me sd
7fb091616000-7fb091619000 rw-p 00000000 00:00 0 
Size:                 12 kB
VmFlags: rd wr mr mw me ac sd dd
7fff6a19a000-7fff6a1bb000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
"""

LIMITS = """\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max file size             unlimited            unlimited            bytes
Max data size             unlimited            unlimited            bytes
Max stack size            8388608              unlimited            bytes
Max core file size        0                    unlimited            bytes
Max resident set          unlimited            unlimited            bytes
Max processes             95671                95671                processes
Max open files            1024                 524288               files
"""

TIMERS = """\
ID: 1
signal: 14/0000000000000000
notify: signal/pid.1234
ClockID: 1
ID: 7
signal: 10/00000000deadbeef
notify: thread/tid.1235
ClockID: 0
"""


def test_parse_smaps() -> None:
    vmas = proctask.parse_smaps(SMAPS)
    assert [v.path for v in vmas] == ["/usr/bin/sleep", "", "[stack]"]
    assert vmas[0].inode == 260875 and vmas[0].perms == "r--p"
    assert "dd" in vmas[1].vm_flags and "gd" in vmas[2].vm_flags
    assert vmas[2].end - vmas[2].start == 0x21000


def test_parse_fdinfo_limits_timers() -> None:
    info = proctask.parse_fdinfo("pos:\t4242\nflags:\t02100002\nmnt_id:\t31\nino:\t77\n")
    assert (info.pos, info.flags, info.ino) == (4242, 0o2100002, 77)
    limits = proctask.parse_limits(LIMITS)
    assert limits[3] == (8388608, proctask.RLIM_INFINITY)
    assert limits[7] == (1024, 524288)
    t = proctask.parse_timers(TIMERS)
    assert [(x.id, x.signo, x.notify, x.clock_id) for x in t] == [
        (1, 14, "signal", 1), (7, 10, "thread", 0)]
    assert t[1].sigval == 0xDEADBEEF and t[1].notify_pid == 1235


def _regs(**kw: int) -> ptrace.Regs:
    base = dict.fromkeys((f for f in ptrace.Regs.__dataclass_fields__), 0)
    base.update(kw)
    return ptrace.Regs(**base)


def test_restart_fixups() -> None:
    neg = lambda v: v & (2**64 - 1)  # noqa: E731
    r = regs.restart_fixup(_regs(rax=neg(-514), orig_rax=230, rip=0x1002))
    assert (r.rax, r.rip, r.orig_syscall) == (230, 0x1000, -1)
    r = regs.restart_fixup(_regs(rax=neg(-516), orig_rax=35, rip=0x1002, rdi=0x10, rsi=0x20))
    assert (r.rax, r.rip, r.rdi, r.orig_syscall) == (35, 0x1000, 0x20, -1)
    r = regs.restart_fixup(_regs(rax=neg(-516), orig_rax=230, rip=0x1002, rsi=0, rdx=1, r10=2))
    assert r.rdx == 2
    r = regs.restart_fixup(_regs(rax=5, orig_rax=0, rip=0x1002))
    assert (r.rax, r.rip, r.orig_syscall) == (5, 0x1002, -1)
    assert ptrace.Regs.unpack(r.pack()) == r


def test_settable_xstate_clears_refused_bits() -> None:
    raw = bytearray(1024)
    struct.pack_into("<QQ", raw, 512, 0xA3 | 1 << 9 | 1 << 18, 0x8000_0000_0000_00A3)
    bv, comp = struct.unpack_from("<QQ", regs.settable_xstate(bytes(raw)), 512)
    assert bv == 0xA3 and comp == 0


def test_batch_encoding_and_refs() -> None:
    b = inject.Batch(0x30000)
    p = b.cstr("/etc/passwd")
    fd = b.call(sysnr.OPEN, p, 0, 0)
    b.call(sysnr.MMAP, 0x10000, 4096, 1, 2, fd, 0, may_fail=True)
    raw = b.pack()
    assert len(raw) == 2 * inject.RECORD.size
    rec = inject.RECORD.unpack_from(raw, inject.RECORD.size)
    assert rec[0] == sysnr.MMAP and rec[5] == 0 and rec[7] == (1 << 4) | inject.FLAG_MAY_FAIL
    assert bytes(b.data[:12]) == b"/etc/passwd\0" and p == 0x30000
    with pytest.raises(errors.BugError):
        b.call(sysnr.CLOSE, inject.Ref(5))


def test_stub_blob_is_position_independent_code() -> None:
    code, runner = native.stub_blob()
    assert code[:3] == b"\x0f\x05\xcc" and runner == 3 and code[-1:] == b"\xcc"


def test_fd_table_plans_lowest_free() -> None:
    t = FdTable()
    b = inject.Batch(0x30000)
    assert [t.open(b, 0, 0, "x") for _ in range(3)] == [0, 1, 2]
    t.close(b, 1)
    assert t.open(b, 0, 0, "y") == 1


def _mm(*vmas: tuple[int, int]) -> image_pb2.Mm:
    return image_pb2.Mm(vmas=[image_pb2.Vma(id=i + 1, start=s, end=e, prot=3,
                                            flags=sysnr.MAP_PRIVATE | sysnr.MAP_ANONYMOUS)
                              for i, (s, e) in enumerate(vmas)])


@pytest.mark.parametrize("vmas", [
    [(0x1000, 0x1800)],                     # not page aligned
    [(0x2000, 0x1000)],                     # empty/backwards
    [(0x10000, 0x20000), (0x18000, 0x30000)],  # overlapping
    [(1 << 47, (1 << 47) + 0x1000)],        # beyond the user address space
    [(0, 0x1000)],                          # below mmap_min_addr
])
def test_check_mm_rejects_bad_layouts(vmas) -> None:
    with pytest.raises(errors.ImageError):
        memory.check_mm(_mm(*vmas))


def test_check_mm_accepts_a_good_layout() -> None:
    memory.check_mm(_mm((0x10000, 0x20000), (0x20000, 0x30000)))


def test_error_kinds() -> None:
    assert error_report(errors.ImageError("x"))["kind"] == "image"
    assert error_report(errors.UnsupportedError("x", pid=3))["context"] == {"pid": 3}
    assert error_report(errors.StateError("x"))["kind"] == "state"
    assert error_report(errors.NotFoundError("x"))["kind"] == "notfound"
    assert error_report(errors.UsageError("x"))["kind"] == "usage"
    assert error_report(OSError(5, "boom"))["kind"] == "system"


def test_page_data_outside_its_vma_is_an_image_error() -> None:
    from ckptd.image.reader import PageRecord
    mm = _mm((0x10000, 0x20000))
    filler = memory.PageFiller(-1, 0, mm)
    for vaddr, vma_id in ((0x1f000, 1), (0x10000, 2), (0x8000, 1)):
        rec = PageRecord(index=5, type=3, offset=100, length=0x2010, flags=0,
                         vaddr=vaddr, vma_id=vma_id, data=memoryview(bytes(0x2000)))
        with pytest.raises(errors.ImageError):
            filler.fill(rec)


def test_page_filler_writes_behind_and_reports_a_failed_write(tmp_path) -> None:
    """Big records are written behind (a failure shows at the next flush),
    small ones at once (a failure shows at once)."""
    from ckptd.image.reader import PageRecord
    big = memory.ASYNC_FILL_MIN

    def rec(vaddr: int, fill: int, size: int = 0x1000) -> PageRecord:
        return PageRecord(index=1, type=3, offset=0, length=size + 0x10, flags=0, vaddr=vaddr,
                          vma_id=1, data=memoryview(bytes([fill]) * size))
    mm = _mm((0x100000, 0x100000 + 2 * big))
    end = 0x100000 + 2 * big
    target = tmp_path / "mem"    # a file stands in for /proc/PID/mem: offset = address
    target.write_bytes(bytes(end))
    fd = os.open(target, os.O_RDWR)
    filler = memory.PageFiller(fd, 0, mm)
    try:
        filler.fill(rec(0x100000, 1))
        filler.fill(rec(0x100000 + big, 4, big))
        filler.fill(rec(end - 0x1000, 2))
        filler.flush()
    finally:
        filler.close()
        os.close(fd)
    data = target.read_bytes()
    assert data[0x100000:0x101000] == b"\x01" * 0x1000 and data[end - 0x1000:] == b"\x02" * 0x1000
    assert data[0x100000 + big:end - 0x1000] == b"\x04" * (big - 0x1000)
    fd = os.open(target, os.O_RDONLY)
    filler = memory.PageFiller(fd, 0, mm)
    try:
        filler.fill(rec(0x100000, 3, big))
        with pytest.raises(OSError):
            filler.flush()
        with pytest.raises(OSError):
            filler.fill(rec(0x100000, 3))
    finally:
        filler.close()
        os.close(fd)


def test_container_log_is_relocated(tmp_path) -> None:
    from ckptd.engine.restore import Metadata, RestoreSession
    new_log = tmp_path / "new.log"
    new_log.write_bytes(b"x" * 10)
    files = image_pb2.Files(fds=[
        image_pb2.Fd(fd=1, kind="file", path="/old/log", flags=0o2001, pos=500),
        image_pb2.Fd(fd=2, kind="file", is_dup=True, dup_of=1, path="/"),
        image_pb2.Fd(fd=3, kind="file", path="/other", pos=7)])
    meta = Metadata(image_pb2.Origin(log_path="/old/log"), image_pb2.Task(), _mm(),
                    files, {})
    RestoreSession(meta).relocate_log(str(new_log))
    assert [(f.path, f.pos) for f in files.fds] == [(str(new_log), 10), ("/", 0),
                                                     ("/other", 7)]


def _thread(tid: int) -> image_pb2.Thread:
    return image_pb2.Thread(tid=tid, regs=bytes(ptrace.REGS_SIZE), xstate=bytes(1024))


@pytest.mark.parametrize("tids", [[], [8, 7], [7, 8, 8], [7, 0], [7, 1 << 22]])
def test_check_threads_rejects_bad_thread_lists(tids) -> None:
    from ckptd.engine import threads
    task = image_pb2.Task(pid=7, threads=[_thread(t) for t in tids])
    with pytest.raises(errors.ImageError):
        threads.check_threads(task)


def test_check_threads_accepts_a_leader_and_its_threads() -> None:
    from ckptd.engine import threads
    threads.check_threads(image_pb2.Task(pid=7, threads=[_thread(t) for t in (7, 9, 8)]))


def test_threads_are_cloned_with_their_tids_in_one_batch() -> None:
    from ckptd.engine import threads
    task = image_pb2.Task(pid=7, threads=[_thread(t) for t in (7, 9, 8)])
    b = inject.Batch(inject.DATA_AT)
    threads.clone_threads(b, task, stack=0x1000, stack_size=0x100)
    assert [c[0] for c in b.calls] == [sysnr.CLONE3, sysnr.CLONE3]
    for (_, (args, size), _, _), tid in zip(b.calls, (9, 8)):
        assert size == 88
        off = args - inject.DATA_AT
        fields = struct.unpack_from("<11Q", b.data, off)
        assert fields[0] == sysnr.CLONE_THREAD_FLAGS and fields[4] == 0   # no exit signal
        assert fields[9] == 1
        assert struct.unpack_from("<i", b.data, fields[8] - inject.DATA_AT)[0] == tid
