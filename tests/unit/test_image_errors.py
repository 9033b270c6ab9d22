"""Every way an image can be bad is an ImageError naming the record and offset.

Images here are framed by hand (``Raw``), so each test breaks exactly one
thing and everything else — crcs, counts, the digest — stays right.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import pytest

from ckptd.errors import ImageError, UsageError
from ckptd.image import ImageReader, ImageWriter, new_header
from ckptd.image import format as fmt
from ckptd.image import registry
from ckptd.image.inspect import inspect_image
from ckptd.v1 import image_pb2

HDR = fmt.RECORD_HEADER_SIZE
PREAMBLE = fmt.PREAMBLE.size


class Raw:
    """A hand-made image: records go in as given, the trailer is computed."""

    def __init__(self, version: int = fmt.FORMAT_VERSION, magic: bytes = fmt.MAGIC) -> None:
        self.buf = bytearray(fmt.PREAMBLE.pack(magic, version))
        self.digest = hashlib.sha256(bytes(self.buf))
        self.counts: Counter[int] = Counter()
        self.payload_bytes = 0
        self.page_bytes = 0
        self.offsets: list[int] = []

    def record(self, rtype: int, payload: bytes, flags: int = 0,
               length: int | None = None) -> Raw:
        length = len(payload) if length is None else length
        crc = fmt.record_crc(rtype, flags, length, payload)
        header = fmt.RecordHeader(rtype, flags, length, crc).pack()
        self.offsets.append(len(self.buf))
        if rtype != registry.TRAILER:
            self.digest.update(header)
            self.counts[rtype] += 1
            self.payload_bytes += length
        self.buf += header + payload
        return self

    def header(self, **fields: object) -> Raw:
        msg = image_pb2.ImageHeader(format_version=fmt.FORMAT_VERSION)
        for k, v in fields.items():
            setattr(msg, k, v)
        return self.record(registry.HEADER, msg.SerializeToString())

    def pages(self, vaddr: int, data: bytes) -> Raw:
        self.page_bytes += len(data)
        return self.record(registry.PAGES, fmt.PAGE_HEADER.pack(vaddr, 0) + data)

    def trailer_message(self) -> image_pb2.Trailer:
        return image_pb2.Trailer(
            counts=[image_pb2.RecordCount(type=t, count=n)  # type: ignore[arg-type]
                    for t, n in sorted(self.counts.items())],
            payload_bytes=self.payload_bytes, page_bytes=self.page_bytes,
            digest=self.digest.digest())

    def trailer(self, msg: image_pb2.Trailer | None = None) -> Raw:
        msg = msg or self.trailer_message()
        return self.record(registry.TRAILER, msg.SerializeToString())

    def bytes(self) -> bytes:
        return bytes(self.buf)


def valid() -> Raw:
    return Raw().header().pages(0x1000, b"p" * 100).pages(0x2000, b"q" * 50)


def reject(data: bytes, match: str, **kwargs: object) -> ImageError:
    with pytest.raises(ImageError, match=match) as info:
        ImageReader(io.BytesIO(data), **kwargs).verify()  # type: ignore[arg-type]
    err = info.value
    assert isinstance(err, UsageError)
    assert "bad image" in str(err) and "byte offset" in str(err)
    return err


def test_the_hand_made_image_is_valid() -> None:
    reader = ImageReader(io.BytesIO(valid().trailer().bytes()))
    assert reader.verify().page_bytes == 150


# -- preamble --------------------------------------------------------------------------

def test_wrong_magic() -> None:
    err = reject(Raw(magic=b"CRIUIMG\x00").header().trailer().bytes(), "wrong magic")
    assert (err.record, err.offset) == ("preamble", 0)


def test_empty_and_truncated_preamble() -> None:
    assert reject(b"", "truncated preamble").offset == 0
    assert reject(fmt.MAGIC + b"\x01", "truncated preamble").offset == 9


@pytest.mark.parametrize("version", [0, 2, 0xFFFF_FFFF])
def test_unknown_version(version: int) -> None:
    err = reject(Raw(version=version).header().trailer().bytes(), f"version {version}")
    assert (err.record, err.offset) == ("preamble", 8)


def test_header_version_disagrees_with_preamble() -> None:
    err = reject(Raw().header(format_version=7).trailer().bytes(), "header says format version 7")
    assert (err.record, err.offset) == ("#0 HEADER", PREAMBLE)


# -- record order ----------------------------------------------------------------------

def test_header_missing() -> None:
    err = reject(Raw().pages(0, b"x").trailer().bytes(), "first record must be the image header")
    assert (err.record, err.offset) == ("#0 PAGES", PREAMBLE)


def test_header_only_trailer() -> None:
    err = reject(Raw().trailer().bytes(), "first record must be the image header")
    assert err.record == "#0 TRAILER"


def test_second_header() -> None:
    raw = valid().header()
    err = reject(raw.trailer().bytes(), "second image header")
    assert (err.record, err.offset) == ("#3 HEADER", raw.offsets[3])


def test_data_after_trailer() -> None:
    raw = valid().trailer()
    err = reject(raw.bytes() + b"\x00", "data after the trailer")
    assert err.record == "#3 TRAILER" and err.offset == len(raw.bytes())


def test_a_whole_image_after_the_trailer() -> None:
    data = valid().trailer().bytes()
    reject(data + data, "data after the trailer")


# -- record headers --------------------------------------------------------------------

@pytest.mark.parametrize("rtype", [0, 77, 2**32 - 1])
def test_unknown_record_type(rtype: int) -> None:
    raw = valid().record(rtype, b"")  # no trailer needed: it fails before
    err = reject(raw.bytes(), f"unknown record type {rtype}")
    assert err.record == ("#3 UNSPECIFIED" if rtype == 0 else f"#3 type {rtype}")
    assert err.offset == raw.offsets[3]


@pytest.mark.parametrize("flags", [0x10, 0x8000_0000, 0x5])
def test_unknown_flags(flags: int) -> None:
    raw = valid().record(registry.PAGES, fmt.PAGE_HEADER.pack(0, 0), flags=flags)
    err = reject(raw.trailer().bytes(), "unsupported record flags")
    assert (err.record, err.offset) == ("#3 PAGES", raw.offsets[3])


@pytest.mark.parametrize("rtype, bound", [
    (registry.HEADER, fmt.MAX_MESSAGE_PAYLOAD),
    (registry.PAGES, fmt.MAX_PAGE_PAYLOAD),
])
def test_length_beyond_bound(rtype: int, bound: int) -> None:
    for length in (bound + 1, 2**64 - 1):
        raw = Raw()
        if rtype != registry.HEADER:
            raw.header()
        raw.record(rtype, b"", length=length)
        err = reject(raw.bytes(), "exceeds the bound")
        assert err.offset == raw.offsets[-1]
        assert err.record == f"#{len(raw.offsets) - 1} {registry.type_name(rtype)}"


def test_page_record_shorter_than_its_header() -> None:
    raw = Raw().header().record(registry.PAGES, b"\x00" * 15)
    err = reject(raw.trailer().bytes(), "shorter than its 16-byte header")
    assert err.record == "#1 PAGES"


def test_page_range_beyond_64_bits() -> None:
    raw = Raw().header().pages(2**64 - 4, b"12345")
    assert reject(raw.trailer().bytes(), "64 bits").record == "#1 PAGES"


# -- payloads --------------------------------------------------------------------------

def test_checksum_mismatch_in_payload() -> None:
    raw = valid().trailer()
    data = bytearray(raw.bytes())
    data[raw.offsets[2] + HDR + 20] ^= 0x40
    err = reject(bytes(data), "checksum mismatch")
    assert (err.record, err.offset) == ("#2 PAGES", raw.offsets[2])


def test_checksum_covers_the_header_fields() -> None:
    raw = valid().trailer()
    data = bytearray(raw.bytes())
    data[raw.offsets[1] + 8] ^= 0x01  # the length field, off by one
    err = reject(bytes(data), "checksum mismatch|truncated")
    assert err.record is not None and err.record.startswith("#1 PAGES")


def test_protobuf_decode_failure() -> None:
    raw = Raw().header().record(registry.TRAILER, b"\xff\xff\xff")
    err = reject(raw.bytes(), "cannot decode ckptd.v1.Trailer")
    assert (err.record, err.offset) == ("#1 TRAILER", raw.offsets[1])


def test_bad_utf8_in_a_string_field() -> None:
    payload = b"\x32\x02\xff\xfe"  # field 6 (hostname), 2 bytes that are not UTF-8
    err = reject(Raw().record(registry.HEADER, payload).trailer().bytes(), "cannot decode")
    assert err.record == "#0 HEADER"


# -- truncation ------------------------------------------------------------------------

def test_eof_without_trailer() -> None:
    raw = valid()
    err = reject(raw.bytes(), "without a trailer")
    assert (err.record, err.offset) == ("#3", len(raw.bytes()))


def test_eof_inside_a_record_header() -> None:
    raw = valid().trailer()
    cut = raw.offsets[2] + 7
    err = reject(raw.bytes()[:cut], "truncated record header")
    assert (err.record, err.offset) == ("#2", cut)


def test_eof_inside_a_payload() -> None:
    raw = valid().trailer()
    cut = raw.offsets[2] + HDR + 30
    err = reject(raw.bytes()[:cut], r"truncated payload \(30 of 66 bytes\)")
    assert (err.record, err.offset) == ("#2 PAGES", cut)


def test_truncated_stream_claiming_a_huge_record_costs_little() -> None:
    raw = Raw().header().record(registry.PAGES, b"", length=fmt.MAX_PAGE_PAYLOAD)
    reader = ImageReader(io.BytesIO(raw.bytes() + b"x" * 1000))
    with pytest.raises(ImageError, match="truncated payload"):
        reader.verify()
    assert len(reader._buf) < 1 << 20  # grew with the data, not with the claim


# -- trailer ---------------------------------------------------------------------------

def test_trailer_counts_mismatch() -> None:
    raw = valid()
    msg = raw.trailer_message()
    msg.counts[1].count += 1
    raw.trailer(msg)
    err = reject(raw.bytes(),
                 r"record counts \{HEADER: 1, PAGES: 3\} != read \{HEADER: 1, PAGES: 2\}")
    assert (err.record, err.offset) == ("#3 TRAILER", raw.offsets[3])


@pytest.mark.parametrize("field", ["payload_bytes", "page_bytes"])
def test_trailer_byte_totals_mismatch(field: str) -> None:
    raw = valid()
    msg = raw.trailer_message()
    setattr(msg, field, getattr(msg, field) + 1)
    reject(raw.trailer(msg).bytes(), field.replace("_", " "))


def test_digest_mismatch() -> None:
    raw = valid()
    msg = raw.trailer_message()
    msg.digest = bytes(32)
    data = raw.trailer(msg).bytes()
    err = reject(data, "stream digest mismatch")
    assert err.record == "#3 TRAILER"
    # Inspection can still look at it when asked not to be strict.
    lenient = ImageReader(io.BytesIO(data), verify_digest=False)
    lenient.verify()
    assert lenient.digest_ok is False
    assert inspect_image(io.BytesIO(data), strict=False)["trailer"]["digest_ok"] is False


def test_digest_catches_swapped_records() -> None:
    # Two page records swapped: every crc holds, the counts hold; only the
    # order differs, which the digest of headers in order catches.
    a, b = valid().trailer(), Raw().header().pages(0x2000, b"q" * 50).pages(0x1000, b"p" * 100)
    b.trailer(a.trailer_message())
    reject(b.bytes(), "stream digest mismatch")


def test_writer_output_with_a_flipped_page_byte() -> None:
    out = io.BytesIO()
    with ImageWriter(out) as w:
        w.write_header(new_header())
        w.write_pages(0, bytes(3 * fmt.PAGE_RECORD_DATA))
    data = bytearray(out.getvalue())
    where = len(data) // 2
    data[where] ^= 1
    err = reject(bytes(data), "checksum mismatch")
    assert err.offset is not None and err.offset < where
