"""Corrupt a valid image at random: reading it raises ImageError or succeeds,
never anything else, never hangs (hypothesis deadline).
"""

from __future__ import annotations

import io
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd.errors import ImageError
from ckptd.image import ChunkReader, ImageReader, ImageWriter, PageRecord, new_header, register
from ckptd.image import format as fmt
from ckptd.image.inspect import inspect_image
from ckptd.v1 import image_pb2

TEST_TYPE = 60001  # as in test_image_roundtrip: a type image.proto will not use
register(TEST_TYPE, image_pb2.ImageSource)


def build() -> bytes:
    out = io.BytesIO()
    with ImageWriter(out) as w:
        w.write_header(new_header(container_id="fuzz", pid=1, labels={"a": "b", "c": "d"}))
        w.write_message(TEST_TYPE, image_pb2.ImageSource(container_id="x" * 40, pid=9))
        for i, n in enumerate([0, 1, 33, 600]):
            w.write_pages(0x1000 * (i + 1), os.urandom(n), vma_id=i)
        w.write_message(TEST_TYPE, image_pb2.ImageSource(container_name="late"))
    return out.getvalue()


IMAGE = build()


def record_offsets(data: bytes) -> list[int]:
    offsets, pos = [], fmt.PREAMBLE.size
    while pos < len(data):
        offsets.append(pos)
        (length,) = struct.unpack_from("<Q", data, pos + 8)
        pos += fmt.RECORD_HEADER_SIZE + length
    return offsets


OFFSETS = record_offsets(IMAGE)


def read_everything(data: bytes, chunk: int = 0) -> None:
    """Read like restore does (every page touched), then like inspect does."""
    source = ChunkReader(data[i:i + chunk] for i in range(0, len(data), chunk)) \
        if chunk else io.BytesIO(data)
    for record in ImageReader(source):
        if isinstance(record, PageRecord):
            bytes(record.data)
    inspect_image(io.BytesIO(data))


def check(data: bytes, chunk: int = 0) -> None:
    try:
        read_everything(data, chunk)
    except ImageError as e:
        assert e.offset is not None and e.record is not None, str(e)
        assert 0 <= e.offset <= len(data), str(e)


FUZZ = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
position = st.integers(0, len(IMAGE) - 1)


def test_the_base_image_is_valid() -> None:
    read_everything(IMAGE)
    read_everything(IMAGE, chunk=7)
    assert OFFSETS[-1] + fmt.RECORD_HEADER_SIZE < len(IMAGE)


@FUZZ
@given(flips=st.lists(st.tuples(position, st.integers(1, 255)), min_size=1, max_size=4))
def test_flipped_bytes(flips: list[tuple[int, int]]) -> None:
    data = bytearray(IMAGE)
    for pos, mask in flips:
        data[pos] ^= mask
    check(bytes(data))


@FUZZ
@given(cut=st.integers(0, len(IMAGE) - 1))
def test_truncated_anywhere(cut: int) -> None:
    try:
        read_everything(IMAGE[:cut])
    except ImageError:
        return
    raise AssertionError(f"a stream cut at {cut} of {len(IMAGE)} was accepted")


@FUZZ
@given(pos=st.integers(0, len(IMAGE)), junk=st.binary(min_size=1, max_size=64),
       chunk=st.sampled_from([0, 1, 5, 4096]))
def test_inserted_bytes(pos: int, junk: bytes, chunk: int) -> None:
    check(IMAGE[:pos] + junk + IMAGE[pos:], chunk)


@FUZZ
@given(pos=position, n=st.integers(1, 64))
def test_deleted_bytes(pos: int, n: int) -> None:
    try:
        read_everything(IMAGE[:pos] + IMAGE[pos + n:])
    except ImageError:
        return
    raise AssertionError(f"deleting {n} bytes at {pos} went unnoticed")


huge = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([2**64 - 1, 2**63, 2**32, fmt.MAX_PAGE_PAYLOAD, fmt.MAX_PAGE_PAYLOAD + 1,
                     fmt.MAX_MESSAGE_PAYLOAD, fmt.MAX_MESSAGE_PAYLOAD + 1]),
    st.integers(0, 4096),
)


@FUZZ
@given(record=st.sampled_from(range(len(OFFSETS))), value=huge)
def test_length_field_overwritten(record: int, value: int) -> None:
    data = bytearray(IMAGE)
    struct.pack_into("<Q", data, OFFSETS[record] + 8, value)
    check(bytes(data))


@FUZZ
@given(pos=st.integers(0, len(IMAGE) - 8), value=huge)
def test_u64_overwritten_anywhere(pos: int, value: int) -> None:
    data = bytearray(IMAGE)
    struct.pack_into("<Q", data, pos, value)
    check(bytes(data))


@FUZZ
@given(record=st.sampled_from(range(len(OFFSETS))),
       field=st.sampled_from([0, 4]), value=st.integers(0, 2**32 - 1))
def test_type_or_flags_overwritten(record: int, field: int, value: int) -> None:
    data = bytearray(IMAGE)
    struct.pack_into("<I", data, OFFSETS[record] + field, value)
    check(bytes(data))


@settings(max_examples=60, deadline=1000)
@given(st.binary(max_size=300))
def test_random_bytes_after_the_magic(tail: bytes) -> None:
    check(fmt.PREAMBLE.pack(fmt.MAGIC, fmt.FORMAT_VERSION) + tail)
