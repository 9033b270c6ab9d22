"""Images as gRPC chunks: ChunkSink, ChunkReader, iter_chunks, bounded memory."""

from __future__ import annotations

import io
import os
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.errors import BugError, ImageError
from ckptd.image import (CHUNK_SIZE, ChunkReader, ChunkSink, ImageReader, ImageWriter,
                         PageRecord, decode_bytes_field, encode_bytes_field, iter_chunks,
                         new_header)
from ckptd.image import format as fmt

STEP = fmt.PAGE_RECORD_DATA


def small_image() -> bytes:
    out = io.BytesIO()
    with ImageWriter(out) as w:
        w.write_header(new_header(container_id="s"))
        for i, n in enumerate([0, 1, 100, 4096, 10_000]):
            w.write_pages(i << 20, os.urandom(n))
    return out.getvalue()


def rechunk(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    """``data`` cut at the given sizes (cycled), zero-length chunks included."""
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        yield data[pos:pos + n]
        pos += n
        i += 1


IMAGE = small_image()


@settings(max_examples=60, deadline=2000)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=20).filter(any))
def test_reader_over_arbitrary_chunks(sizes: list[int]) -> None:
    reader = ImageReader(ChunkReader(rechunk(IMAGE, sizes)))
    pages = [bytes(r.data) for r in reader if isinstance(r, PageRecord)]
    assert [len(p) for p in pages] == [0, 1, 100, 4096, 10_000]
    assert reader.header is not None and reader.header.source.container_id == "s"


@settings(max_examples=60, deadline=2000)
@given(chunk_size=st.integers(1, 3000),
       writes=st.lists(st.binary(max_size=7000), max_size=12))
def test_chunk_sink_cuts_evenly(chunk_size: int, writes: list[bytes]) -> None:
    chunks: list[bytes] = []
    sink = ChunkSink(chunks.append, chunk_size)
    for data in writes:
        assert sink.write(memoryview(data)) == len(data)
    sink.flush()
    sink.flush()
    assert b"".join(chunks) == b"".join(writes)
    assert all(len(c) == chunk_size for c in chunks[:-1])
    assert all(0 < len(c) <= chunk_size for c in chunks)
    assert sink.bytes_emitted == sum(map(len, writes))


def test_chunk_sink_copies_the_callers_buffer() -> None:
    chunks: list[bytes] = []
    sink = ChunkSink(chunks.append, 4)
    buf = bytearray(b"abcdefgh")
    sink.write(buf)
    buf[:] = b"zzzzzzzz"
    assert chunks == [b"abcd", b"efgh"]


def test_writer_through_chunks_to_reader() -> None:
    chunks: list[bytes] = []
    payload = os.urandom(3 * STEP + 123)
    with ImageWriter(ChunkSink(chunks.append)) as w:
        w.write_header(new_header())
        w.write_pages(0x40_0000, payload)
    assert all(len(c) <= CHUNK_SIZE for c in chunks)
    assert all(len(c) == CHUNK_SIZE for c in chunks[:-1])
    got = b"".join(bytes(r.data) for r in ImageReader(ChunkReader(chunks))
                   if isinstance(r, PageRecord))
    assert got == payload


def test_chunk_reader_is_a_file() -> None:
    f = ChunkReader([b"ab", b"", memoryview(b"cde"), bytearray(b"f")])
    assert f.readable()
    assert f.read(3) == b"abc"
    buf = bytearray(10)
    assert f.readinto(buf) == 3 and buf[:3] == b"def"
    assert f.read(5) == b""
    assert ChunkReader([b"xy", b"z"]).read() == b"xyz"
    with io.BufferedReader(ChunkReader(iter([IMAGE]))) as buffered:
        ImageReader(buffered).verify()


def test_chunk_reader_passes_on_errors_of_the_stream() -> None:
    def cancelled() -> Iterator[bytes]:
        yield IMAGE[:100]
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        ImageReader(ChunkReader(cancelled())).verify()


def test_chunk_stream_cut_short_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="truncated|without a trailer"):
        ImageReader(ChunkReader(rechunk(IMAGE[:-5], [333]))).verify()


def test_iter_chunks() -> None:
    assert list(iter_chunks(io.BytesIO(b"abcdefg"), 3)) == [b"abc", b"def", b"g"]
    assert list(iter_chunks(io.BytesIO(b""))) == []
    with pytest.raises(BugError):
        list(iter_chunks(io.BytesIO(b"x"), 0))
    with pytest.raises(BugError):
        ChunkSink(lambda c: None, 0)


def test_bounded_memory_over_a_large_streamed_image() -> None:
    """A 64 MiB image produced on the fly and read back through the chunk
    adapters never has more than a few MiB allocated at once."""
    total = 64 << 20
    block = os.urandom(1 << 20)

    def produce() -> Iterator[bytes]:
        chunks: list[bytes] = []
        writer = ImageWriter(ChunkSink(chunks.append))
        writer.write_header(new_header())
        for i in range(total // len(block)):
            writer.write_pages(i * len(block), block)
            yield from chunks
            chunks.clear()
        writer.close()
        yield from chunks

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        seen = 0
        for record in ImageReader(ChunkReader(produce())):
            if isinstance(record, PageRecord):
                seen += record.data.nbytes
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == total
    # Allocated at once: a chunk or two in flight, ChunkSink's pending bytes
    # and their copy, and the reader's one-record buffer — each ~1 MiB.
    assert peak - base < 6 << 20, f"peak {peak - base} bytes"


# -- the wire form of image chunks ------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, CHUNK_SIZE, 4 * CHUNK_SIZE + 3])
def test_bytes_field_is_the_protobuf_wire_form(size: int) -> None:
    from ckptd.v1 import api_pb2
    data = os.urandom(size)
    chunk = encode_bytes_field(1, data)
    assert api_pb2.ImageChunk.FromString(chunk).data == data
    if size:  # protobuf leaves an empty field out; ours is still a valid message
        assert chunk == api_pb2.ImageChunk(data=data).SerializeToString()
    request = api_pb2.RestartRequest(data=data).SerializeToString()
    assert encode_bytes_field(2, data) == request
    view = decode_bytes_field(request, 2)
    assert isinstance(view, memoryview) and view.obj is request and bytes(view) == data


def test_anything_but_exactly_one_bytes_field_is_left_to_protobuf() -> None:
    from ckptd.v1 import api_pb2
    data = encode_bytes_field(2, b"abc")
    options = api_pb2.RestartRequest(options=api_pb2.RestartOptions(name="x"))
    for raw in (b"", data[:-1], data + b"\x10\x01", options.SerializeToString(),
                b"\x12" + b"\xff" * 11, encode_bytes_field(1, b"abc")):
        assert decode_bytes_field(raw, 2) is None
    with pytest.raises(BugError):
        encode_bytes_field(16, b"")
