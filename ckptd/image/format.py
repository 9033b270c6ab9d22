"""The byte layout of an image: constants, fixed headers, checksums, bounds.

Pure functions and values only; the writer and the reader share them so the
two sides cannot drift apart. The layout is described in the package docstring
(``ckptd/image/__init__.py``).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ckptd.errors import ImageError
from ckptd.native import crc32

MAGIC = b"CKPTIMG\x00"
FORMAT_VERSION = 1

PREAMBLE = struct.Struct("<8sI")          # magic, format version
RECORD_PREFIX = struct.Struct("<IIQ")     # type, flags, length (covered by the crc)
RECORD_CRC = struct.Struct("<I")
RECORD_HEADER_SIZE = RECORD_PREFIX.size + RECORD_CRC.size   # 20
PAGE_HEADER = struct.Struct("<QQ")        # vaddr of the first byte, vma id

# Far above any real metadata message (a task with a million open fds is tens
# of MiB) and the protobuf C++ default parse limit, so a larger length can
# only be a corrupt or hostile image; the reader allocates at most this much.
MAX_MESSAGE_PAYLOAD = 64 << 20
# The writer cuts page data into records of PAGE_RECORD_DATA bytes; the reader
# accepts much larger ones (other writers, future compression blocks) but not
# unbounded: a corrupt length must not make the daemon allocate gigabytes.
MAX_PAGE_PAYLOAD = PAGE_HEADER.size + (256 << 20)
# 1 MiB per page record: the per-record cost (36 bytes, a few µs of Python)
# is < 1% at this size; a 2 MiB write_pages call already spans two records,
# so checksumming overlaps writing (see writer.py); and the reader needs only
# a 1 MiB buffer. Measured: 4 MiB records made 4 MiB calls ~2x slower.
PAGE_RECORD_DATA = 1 << 20

_U64_MAX = (1 << 64) - 1


class Compression(enum.IntEnum):
    """Compression of a record's payload, in the low bits of its flags."""

    NONE = 0


# Flags layout: bits 0-3 compression, every other bit reserved (must be 0).
FLAG_COMPRESSION_MASK = 0x0000_000F
FLAGS_KNOWN = FLAG_COMPRESSION_MASK


@dataclass(frozen=True)
class RecordHeader:
    """The fixed 20 bytes in front of every record's payload."""

    type: int
    flags: int
    length: int
    crc: int

    def pack(self) -> bytes:
        return RECORD_PREFIX.pack(self.type, self.flags, self.length) + RECORD_CRC.pack(self.crc)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> RecordHeader:
        rtype, flags, length = RECORD_PREFIX.unpack_from(raw)
        (crc,) = RECORD_CRC.unpack_from(raw, RECORD_PREFIX.size)
        return cls(rtype, flags, length, crc)


def record_crc(rtype: int, flags: int, length: int,
               *parts: bytes | bytearray | memoryview) -> int:
    """crc32 over (type, flags, length) then the payload parts.

    Covering the header fields too means a flipped type or length bit is
    caught at that record instead of only at the trailer's digest.
    """
    crc = crc32(RECORD_PREFIX.pack(rtype, flags, length))
    for part in parts:
        crc = crc32(part, crc)
    return crc


def compression_of(flags: int) -> Compression:
    """The compression named by ``flags``; ValueError if unknown bits are set."""
    if flags & ~FLAGS_KNOWN:
        raise ValueError(f"unknown flag bits {flags & ~FLAGS_KNOWN:#x}")
    return Compression(flags & FLAG_COMPRESSION_MASK)


def max_payload(is_pages: bool) -> int:
    return MAX_PAGE_PAYLOAD if is_pages else MAX_MESSAGE_PAYLOAD


def check_preamble(raw: bytes) -> int:
    """Validate the 12-byte preamble; return the format version."""
    magic = raw[:len(MAGIC)]
    if magic != MAGIC[:len(magic)]:
        raise ImageError(f"wrong magic {magic!r}, expected {MAGIC!r} (not a ckptd image)",
                         offset=0, record="preamble")
    if len(raw) < PREAMBLE.size:
        raise ImageError(f"truncated preamble ({len(raw)} of {PREAMBLE.size} bytes)",
                         offset=len(raw), record="preamble")
    _, version = PREAMBLE.unpack(raw)
    if version != FORMAT_VERSION:
        raise ImageError(f"unsupported format version {version}, this ckptd reads "
                         f"version {FORMAT_VERSION}", offset=len(MAGIC), record="preamble")
    return version


def check_u64(value: int) -> None:
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{value:#x} does not fit in 64 bits")


def check_range(vaddr: int, size: int) -> None:
    """Raise ValueError unless [vaddr, vaddr + size) fits in 64 bits."""
    if vaddr < 0 or size < 0 or vaddr + size > _U64_MAX + 1:
        raise ValueError(f"address range {vaddr:#x}+{size:#x} does not fit in 64 bits")
