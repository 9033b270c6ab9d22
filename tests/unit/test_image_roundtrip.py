"""Image writer -> reader round trips, the record table, writer misuse, inspection."""

from __future__ import annotations

import array
import io
import json
import mmap
import os
from typing import Any

import pytest

from ckptd.errors import BugError, ImageError
from ckptd.image import (FORMAT_VERSION, MAGIC, ImageReader, ImageWriter, MessageRecord,
                         PageRecord, new_header, register)
from ckptd.image import format as fmt
from ckptd.image import registry
from ckptd.image.inspect import inspect_image, summarize
from ckptd.v1 import image_pb2

# A record type image.proto will not use, carrying a message with strings.
TEST_TYPE = 60001
register(TEST_TYPE, image_pb2.ImageSource)

STEP = fmt.PAGE_RECORD_DATA
PAGE_SIZES = [0, 1, 4095, 4096, STEP - 1, STEP, STEP + 1, 3 * STEP + 5]


def write(build) -> bytes:
    out = io.BytesIO()
    with ImageWriter(out) as writer:
        writer.write_header(new_header(container_id="c1", pid=7, labels={"app": "web"}))
        build(writer)
    return out.getvalue()


def read_all(data: bytes) -> tuple[ImageReader, list[tuple[Any, ...]]]:
    reader = ImageReader(io.BytesIO(data))
    records: list[tuple[Any, ...]] = []
    for record in reader:
        if isinstance(record, PageRecord):
            records.append(("pages", record.vaddr, record.vma_id, bytes(record.data)))
        else:
            records.append(("msg", record.type, record.message))
    return reader, records


def test_round_trip_header_messages_and_pages() -> None:
    blobs = [os.urandom(n) for n in PAGE_SIZES]

    def build(w: ImageWriter) -> None:
        w.write_message(TEST_TYPE, image_pb2.ImageSource(container_id="first", pid=1))
        for i, blob in enumerate(blobs):
            w.write_pages(0x10_0000 * (i + 1), blob, vma_id=i)
            w.write_message(TEST_TYPE, image_pb2.ImageSource(container_name=f"n{i}"))

    data = write(build)
    assert data.startswith(MAGIC)
    reader, records = read_all(data)

    header = reader.header
    assert header is not None
    assert header.format_version == FORMAT_VERSION
    assert header.source.container_id == "c1" and header.source.pid == 7
    assert dict(header.labels) == {"app": "web"}
    assert header.kernel_release == os.uname().release and header.page_size == mmap.PAGESIZE

    messages = [r[2] for r in records if r[0] == "msg"]
    assert messages[0] == image_pb2.ImageSource(container_id="first", pid=1)
    assert [m.container_name for m in messages[1:]] == [f"n{i}" for i in range(len(blobs))]

    # Each buffer comes back whole, possibly cut into records with addresses
    # that continue where the previous record ended.
    pages = [r for r in records if r[0] == "pages"]
    for i, blob in enumerate(blobs):
        mine = [p for p in pages if p[2] == i]
        assert b"".join(p[3] for p in mine) == blob
        assert len(mine) == max(1, -(-len(blob) // STEP))
        assert [p[1] for p in mine] == [0x10_0000 * (i + 1) + k * STEP for k in range(len(mine))]

    trailer = reader.trailer
    assert trailer is not None and reader.digest_ok
    counts = {registry.type_name(c.type): c.count for c in trailer.counts}
    assert counts == {"HEADER": 1, "PAGES": len(pages), "type 60001": len(blobs) + 1}
    assert trailer.page_bytes == sum(PAGE_SIZES)


def test_bytes_written_counts_everything() -> None:
    out = io.BytesIO()
    writer = ImageWriter(out)
    writer.write_header(new_header())
    writer.write_pages(0, bytes(5000))
    assert writer.bytes_written == len(out.getvalue())
    assert writer.page_bytes == 5000
    writer.close()
    writer.close()  # idempotent
    assert writer.bytes_written == len(out.getvalue())
    ImageReader(io.BytesIO(out.getvalue())).verify()


@pytest.mark.parametrize("make", [
    bytes, bytearray, lambda b: memoryview(b), lambda b: array.array("Q", b),
    lambda b: memoryview(b)[8:],
])
def test_write_pages_takes_any_byte_buffer(make) -> None:
    raw = os.urandom(8 * 1000)
    buf = make(raw)
    expected = bytes(memoryview(buf).cast("B"))
    _, records = read_all(write(lambda w: w.write_pages(0x4000, buf)))
    assert records == [("pages", 0x4000, 0, expected)]


def test_write_pages_from_mmap() -> None:
    with mmap.mmap(-1, 3 * STEP) as m:
        m[:] = os.urandom(3 * STEP)
        _, records = read_all(write(lambda w: w.write_pages(0x7f00_0000_0000, m)))
        assert b"".join(r[3] for r in records) == m[:]


class TrickleFile(io.RawIOBase):
    """A raw sink that takes at most 1000 bytes per write, like a socket."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        chunk = bytes(memoryview(b)[:1000])
        self.data += chunk
        return len(chunk)


def test_short_writes_are_completed() -> None:
    sink = TrickleFile()
    with ImageWriter(sink) as writer:
        writer.write_header(new_header())
        writer.write_pages(0, os.urandom(3 * STEP + 7))
    assert ImageReader(io.BytesIO(bytes(sink.data))).verify().page_bytes == 3 * STEP + 7


def test_failed_write_leaves_no_trailer() -> None:
    out = io.BytesIO()
    with pytest.raises(RuntimeError):
        with ImageWriter(out) as writer:
            writer.write_header(new_header())
            writer.write_pages(0, bytes(100))
            raise RuntimeError("dump failed")
    with pytest.raises(ImageError, match="without a trailer"):
        ImageReader(io.BytesIO(out.getvalue())).verify()


def test_page_data_is_invalid_after_the_next_record() -> None:
    data = write(lambda w: (w.write_pages(0, b"a" * 100), w.write_pages(4096, b"b" * 100)))
    it = iter(ImageReader(io.BytesIO(data)))
    first = next(it)
    assert isinstance(first, PageRecord) and bytes(first.data) == b"a" * 100
    second = next(it)
    with pytest.raises(ValueError):
        bytes(first.data)  # released: kept past its lifetime fails loudly
    assert isinstance(second, PageRecord) and bytes(second.data) == b"b" * 100


def test_kept_page_data_lives_until_that_many_more_records() -> None:
    pages = [bytes([65 + i]) * 100 for i in range(4)]
    data = write(lambda w: [w.write_pages(i * 4096, p) for i, p in enumerate(pages)])
    reader = ImageReader(io.BytesIO(data))
    reader.keep_pages(2)
    it = iter(reader)
    records = [next(it), next(it)]
    assert [bytes(r.data) for r in records] == pages[:2]  # the first outlived one read
    records.append(next(it))
    with pytest.raises(ValueError):
        bytes(records[0].data)  # its buffer was reused: released
    assert [bytes(r.data) for r in records[1:]] == pages[1:3]
    assert bytes(next(it).data) == pages[3]
    assert next(it, None) is None and reader.trailer is not None


def test_keep_pages_needs_at_least_one() -> None:
    with pytest.raises(BugError):
        ImageReader(io.BytesIO(b"")).keep_pages(0)


def test_read_header_before_iteration_and_iterating_once() -> None:
    data = write(lambda w: w.write_message(TEST_TYPE, image_pb2.ImageSource(pid=3)))
    reader = ImageReader(io.BytesIO(data))
    header = reader.read_header()
    assert reader.read_header() is header
    records = list(reader)
    assert len(records) == 1 and isinstance(records[0], MessageRecord)
    assert records[0].index == 1 and records[0].name == "type 60001"
    with pytest.raises(BugError):
        list(reader)


# -- misuse of the writer is our bug, not a bad image -------------------------------

def test_writer_misuse() -> None:
    w = ImageWriter(io.BytesIO())
    with pytest.raises(BugError, match="header must be written first"):
        w.write_pages(0, b"x")
    with pytest.raises(BugError):
        w.write_header(image_pb2.ImageHeader(format_version=2))
    w.write_header(new_header())
    with pytest.raises(BugError, match="twice"):
        w.write_header(new_header())
    with pytest.raises(BugError, match="carries"):
        w.write_message(TEST_TYPE, image_pb2.Trailer())
    with pytest.raises(BugError, match="no message class"):
        w.write_message(424242, image_pb2.ImageSource())
    with pytest.raises(BugError, match="written by the writer"):
        w.write_message(registry.TRAILER, image_pb2.Trailer())
    with pytest.raises(BugError, match="64 bits"):
        w.write_pages(2**64 - 10, bytes(11))
    with pytest.raises(BugError, match="64 bits"):
        w.write_pages(0, b"", vma_id=2**64)
    w.close()
    with pytest.raises(BugError, match="closed"):
        w.write_pages(0, b"x")


def test_register_rules() -> None:
    register(TEST_TYPE, image_pb2.ImageSource)  # again: fine
    with pytest.raises(BugError, match="already"):
        register(TEST_TYPE, image_pb2.Trailer)
    with pytest.raises(BugError):
        register(registry.PAGES, image_pb2.ImageSource)
    with pytest.raises(BugError):
        register(image_pb2.RECORD_TYPE_UNSPECIFIED, image_pb2.ImageSource)
    with pytest.raises(BugError):
        register(2**31, image_pb2.ImageSource)  # the trailer counts types as int32
    assert registry.message_class(registry.HEADER) is image_pb2.ImageHeader
    assert registry.type_name(registry.PAGES) == "PAGES"
    assert registry.type_name(999) == "type 999"


# -- inspection ------------------------------------------------------------------------

def test_inspect_image_is_json_and_complete() -> None:
    def build(w: ImageWriter) -> None:
        w.write_message(TEST_TYPE, image_pb2.ImageSource(container_id="x"))
        w.write_pages(0x1000, bytes(3 * 4096), vma_id=9)
        w.write_pages(0x9000, b"")

    data = write(build)
    result = inspect_image(io.BytesIO(data))
    json.dumps(result)  # serialisable as is
    assert result["format_version"] == 1
    assert result["header"]["source"]["container_id"] == "c1"
    assert result["header"]["labels"] == {"app": "web"}
    kinds = [(r["type"], r["index"]) for r in result["records"]]
    assert kinds == [("type 60001", 1), ("PAGES", 2), ("PAGES", 3)]
    assert result["records"][0]["message"]["container_id"] == "x"
    page = result["records"][1]
    assert page["vaddr"] == "0x1000" and page["vma_id"] == 9 and page["data_bytes"] == 3 * 4096
    assert "data" not in page
    assert result["pages"] == {"records": 2, "bytes": 3 * 4096, "page_size": mmap.PAGESIZE,
                               "pages": 3 * 4096 // mmap.PAGESIZE}
    assert result["trailer"]["digest_ok"] is True
    assert result["trailer"]["counts"] == {"HEADER": 1, "PAGES": 2, "type 60001": 1}
    assert result["total_bytes"] == len(data)

    text = summarize(result)
    assert "format version 1" in text and "container c1" in text
    assert "PAGES 2" in text and "digest   OK" in text


def test_inspect_rejects_garbage() -> None:
    with pytest.raises(ImageError, match="wrong magic"):
        inspect_image(io.BytesIO(b"definitely not a ckptd image"))


class LendingBuffer:
    """A sink that lends the first ``room`` bytes of its buffer (as a mapped
    file does) and takes plain writes after that."""

    def __init__(self, room: int) -> None:
        self.buf = bytearray(room)
        self.pos = 0
        self.tail = bytearray()

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        fit = max(0, min(data.nbytes, len(self.buf) - self.pos))
        self.buf[self.pos:self.pos + fit] = data[:fit]
        self.tail += data[fit:]
        self.pos += data.nbytes
        return data.nbytes

    def take(self, n: int):
        if self.pos + n > len(self.buf):
            return None
        self.pos += n
        return memoryview(self.buf)[self.pos - n:self.pos]

    def getvalue(self) -> bytes:
        return bytes(self.buf[:min(self.pos, len(self.buf))]) + bytes(self.tail)


@pytest.mark.parametrize("room", [0, 3 * STEP, 64 * STEP])
def test_pages_filled_in_place_are_the_same_image(room: int) -> None:
    """page_slots + seal_pages make the bytes write_pages would, and the
    writer falls back to writing where the sink lends no more room."""
    blobs = [os.urandom(n) for n in (1, 4096, STEP, 2 * STEP + 7, 4 * STEP)]

    def build(w: ImageWriter, lend: bool) -> None:
        w.write_message(TEST_TYPE, image_pb2.ImageSource(container_id="first", pid=1))
        for i, blob in enumerate(blobs):
            slots = w.page_slots(0x10_0000 * (i + 1), len(blob), vma_id=i) if lend else None
            if slots is None:
                w.write_pages(0x10_0000 * (i + 1), blob, vma_id=i)
                continue
            at = 0
            for view in slots.data:
                view[:] = blob[at:at + view.nbytes]
                at += view.nbytes
            w.seal_pages(slots)

    expected = write(lambda w: build(w, False))
    sink = LendingBuffer(room)
    with ImageWriter(sink) as writer:
        writer.write_header(new_header(container_id="c1", pid=7, labels={"app": "web"}))
        build(writer, True)
    written = writer.bytes_written
    got = sink.getvalue()
    # The header's creation time differs; every record and length is the same.
    assert len(got) == len(expected) == written
    assert read_all(got)[1] == read_all(expected)[1]
    pages: dict[int, bytes] = {}
    for r in read_all(got)[1]:
        if r[0] == "pages":
            pages[r[2]] = pages.get(r[2], b"") + r[3]
    assert [pages[i] for i in range(len(blobs))] == blobs


def test_a_sink_that_lends_nothing_gets_no_slots() -> None:
    out = io.BytesIO()
    with ImageWriter(out) as w:
        w.write_header(new_header(container_id="c1", pid=7))
        assert w.page_slots(0x1000, 4096) is None
