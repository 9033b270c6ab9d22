"""ImageReader: the one reader of images, from a file or from gRPC chunks.

Streaming with bounded memory: one record's payload at a time, in a buffer
reused from record to record (or a few in turn, see ``keep_pages``). Everything that can be wrong with the bytes is
an ``ImageError`` naming the record (``#index TYPE``) and the byte offset;
anything else escaping from here is a bug.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import DecodeError, Message

from ckptd.errors import BugError, ImageError
from ckptd.image import format as fmt
from ckptd.image import registry
from ckptd.v1 import image_pb2

# First size of the payload buffer; it doubles up to the largest record seen,
# so a truncated stream claiming a huge length costs only what it delivered.
_INITIAL_BUFFER = 64 << 10


class Source(Protocol):
    """Anything with a blocking ``read(n)``; ``readinto`` is used when present."""

    def read(self, n: int, /) -> bytes: ...


@dataclass(frozen=True)
class MessageRecord:
    """A metadata record, decoded to its protobuf message."""

    index: int          # position in the stream; the header is #0
    type: int           # a RecordType value
    offset: int         # byte offset of the record header in the stream
    length: int         # payload bytes
    flags: int
    message: Message

    @property
    def name(self) -> str:
        return registry.type_name(self.type)


@dataclass(frozen=True)
class PageRecord:
    """Raw page data. ``data`` is valid only until the next record is read
    (the reader reuses its buffer; ``keep_pages`` makes that later); keep
    ``bytes(record.data)`` if needed."""

    index: int
    type: int
    offset: int
    length: int         # payload bytes, page header included
    flags: int
    vaddr: int          # address of data[0] in the dumped task
    vma_id: int
    data: memoryview

    @property
    def name(self) -> str:
        return registry.type_name(self.type)


Record = MessageRecord | PageRecord


class ImageReader:
    """Read and validate one image: ``read_header()``, then iterate the body.

    Iteration yields every record between the header and the trailer, then
    checks the trailer and that nothing follows it. Only a fully iterated
    image is known good; ``verify()`` does that and returns the trailer.
    """

    def __init__(self, source: Source, *, verify_digest: bool = True) -> None:
        self._source = source
        self._readinto = getattr(source, "readinto", None)
        self._verify_digest = verify_digest
        # Payload buffers used in turn, one per record, and the page data
        # handed out of each (released when its buffer is reused).
        self._bufs = [bytearray(0)]
        self._handed_out: list[memoryview | None] = [None]
        self._slot = 0
        self._offset = 0
        self._index = 0
        self._digest = hashlib.sha256()
        self._counts: Counter[int] = Counter()
        self._payload_bytes = 0
        self._page_bytes = 0
        self._version = 0
        self._iterating = False
        self.header: image_pb2.ImageHeader | None = None
        self.trailer: image_pb2.Trailer | None = None
        self.trailer_offset: int | None = None
        self.digest_ok: bool | None = None

    @property
    def offset(self) -> int:
        """Bytes consumed so far."""
        return self._offset

    @property
    def _buf(self) -> bytearray:
        """The payload buffer of the record being (or last) read."""
        return self._bufs[self._slot]

    def keep_pages(self, records: int) -> None:
        """Keep each page record's data valid until ``records`` more records
        have been read (default 1), so a consumer can write one record out
        while the next is being read and checked. One buffer per record kept."""
        if records < 1:
            raise BugError(f"records must be kept for at least one read, not {records}")
        while len(self._bufs) < records:
            self._bufs.append(bytearray(0))
            self._handed_out.append(None)

    def read_header(self) -> image_pb2.ImageHeader:
        """Read the preamble and the header record (once; later calls return it)."""
        if self.header is not None:
            return self.header
        raw = self._read_small(fmt.PREAMBLE.size)
        self._version = fmt.check_preamble(raw)
        self._digest.update(raw)
        record = self._next_record()
        assert isinstance(record, MessageRecord)  # _next_record checked it is the header
        assert isinstance(record.message, image_pb2.ImageHeader)
        self.header = record.message
        return self.header

    def __iter__(self) -> Iterator[Record]:
        if self._iterating:
            raise BugError("an ImageReader can be iterated only once")
        self._iterating = True
        self.read_header()
        while True:
            record = self._next_record()
            if record is None:
                return
            yield record

    def verify(self) -> image_pb2.Trailer:
        """Read to the end, checking everything; return the trailer."""
        for _ in self:
            pass
        assert self.trailer is not None
        return self.trailer

    def _next_record(self) -> Record | None:
        """The next body record, or None once the trailer has checked out."""
        self._slot = (self._slot + 1) % len(self._bufs)
        self._release_handed_out()
        index, offset = self._index, self._offset
        header = self._read_record_header(index, offset)
        where = f"#{index} {registry.type_name(header.type)}"
        self._check_header(header, index, offset, where)
        payload = self._read_payload(header.length, offset, where)
        crc = fmt.record_crc(header.type, header.flags, header.length, payload)
        if crc != header.crc:
            raise ImageError(f"checksum mismatch: stored {header.crc:#010x}, "
                             f"computed {crc:#010x}", offset=offset, record=where)
        self._index += 1
        if header.type == registry.TRAILER:
            self._finish(self._decode(header, payload, offset, where), offset, where)
            return None
        self._digest.update(header.pack())
        self._counts[header.type] += 1
        self._payload_bytes += header.length
        if header.type == registry.PAGES:
            return self._page_record(header, payload, index, offset, where)
        message = self._decode(header, payload, offset, where)
        if header.type == registry.HEADER:
            self._check_version(message, offset, where)
        return MessageRecord(index, header.type, offset, header.length, header.flags, message)

    def _read_record_header(self, index: int, offset: int) -> fmt.RecordHeader:
        raw = self._read_small(fmt.RECORD_HEADER_SIZE)
        if not raw:
            raise ImageError("stream ends without a trailer (incomplete image)",
                             offset=offset, record=f"#{index}")
        if len(raw) < fmt.RECORD_HEADER_SIZE:
            raise ImageError(f"truncated record header ({len(raw)} of "
                             f"{fmt.RECORD_HEADER_SIZE} bytes)",
                             offset=self._offset, record=f"#{index}")
        return fmt.RecordHeader.unpack(raw)

    def _check_header(self, header: fmt.RecordHeader, index: int, offset: int,
                      where: str) -> None:
        """Everything knowable before reading the payload."""
        if not registry.is_known(header.type):
            raise ImageError(f"unknown record type {header.type}", offset=offset, record=where)
        try:
            compression = fmt.compression_of(header.flags)
        except ValueError as e:
            raise ImageError(f"unsupported record flags {header.flags:#x}: {e}",
                             offset=offset, record=where) from e
        if compression is not fmt.Compression.NONE:
            raise ImageError(f"compression {compression.name} is not supported",
                             offset=offset, record=where)
        if index == 0 and header.type != registry.HEADER:
            raise ImageError("the first record must be the image header",
                             offset=offset, record=where)
        if index > 0 and header.type == registry.HEADER:
            raise ImageError("a second image header", offset=offset, record=where)
        is_pages = header.type in registry.RAW_TYPES
        bound = fmt.max_payload(is_pages)
        if header.length > bound:
            raise ImageError(f"record length {header.length} exceeds the bound of {bound} bytes",
                             offset=offset, record=where)
        if is_pages and header.length < fmt.PAGE_HEADER.size:
            raise ImageError(f"page record of {header.length} bytes is shorter than its "
                             f"{fmt.PAGE_HEADER.size}-byte header", offset=offset, record=where)

    def _decode(self, header: fmt.RecordHeader, payload: memoryview, offset: int,
                where: str) -> Message:
        cls = registry.message_class(header.type)
        assert cls is not None  # _check_header accepted the type
        message = cls()
        try:
            message.ParseFromString(payload)
        except DecodeError as e:
            raise ImageError(f"cannot decode {cls.DESCRIPTOR.full_name}: {e}",
                             offset=offset, record=where) from e
        return message

    def _check_version(self, header: Message, offset: int, where: str) -> None:
        assert isinstance(header, image_pb2.ImageHeader)
        if header.format_version != self._version:
            raise ImageError(f"header says format version {header.format_version}, "
                             f"the stream {self._version}", offset=offset, record=where)

    def _page_record(self, header: fmt.RecordHeader, payload: memoryview, index: int,
                     offset: int, where: str) -> PageRecord:
        vaddr, vma_id = fmt.PAGE_HEADER.unpack_from(payload)
        data = payload[fmt.PAGE_HEADER.size:]
        try:
            fmt.check_range(vaddr, data.nbytes)
        except ValueError as e:
            raise ImageError(str(e), offset=offset, record=where) from e
        self._page_bytes += data.nbytes
        self._handed_out[self._slot] = data
        return PageRecord(index, header.type, offset, header.length, header.flags,
                          vaddr, vma_id, data)

    def _finish(self, trailer: Message, offset: int, where: str) -> None:
        """Check the trailer against what was read, and that nothing follows."""
        assert isinstance(trailer, image_pb2.Trailer)
        counted = sorted(self._counts.items())
        claimed = sorted((c.type, c.count) for c in trailer.counts)
        problems = []
        if claimed != counted:
            problems.append(f"record counts {_counts_text(claimed)} "
                            f"!= read {_counts_text(counted)}")
        if trailer.payload_bytes != self._payload_bytes:
            problems.append(f"payload bytes {trailer.payload_bytes} != read {self._payload_bytes}")
        if trailer.page_bytes != self._page_bytes:
            problems.append(f"page bytes {trailer.page_bytes} != read {self._page_bytes}")
        if problems:
            raise ImageError("trailer does not match the image: " + "; ".join(problems),
                             offset=offset, record=where)
        self.digest_ok = trailer.digest == self._digest.digest()
        if not self.digest_ok and self._verify_digest:
            raise ImageError(f"stream digest mismatch: trailer {trailer.digest.hex()}, "
                             f"computed {self._digest.hexdigest()}", offset=offset, record=where)
        if self._read_small(1):
            raise ImageError("data after the trailer", offset=self._offset - 1, record=where)
        # No log line here: ckptctl reads images too, and an unconfigured
        # structlog prints to stdout, into its JSON. Callers log the outcome.
        self.trailer, self.trailer_offset = trailer, offset

    def _read_small(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at end of stream."""
        parts = []
        want = n
        while want:
            chunk = self._source.read(want)
            if not chunk:
                break
            parts.append(chunk)
            want -= len(chunk)
        raw = b"".join(parts)
        self._offset += len(raw)
        return raw

    def _read_payload(self, length: int, offset: int, where: str) -> memoryview:
        """Exactly ``length`` payload bytes, as a view into the reused buffer."""
        buf = self._buf
        got = 0
        while got < length:
            if got == len(buf):
                # A fresh buffer, never a resize: the caller may still hold a
                # view of the old one, and resizing an exported buffer fails.
                grown = bytearray(min(length, max(2 * len(buf), _INITIAL_BUFFER)))
                memoryview(grown)[:got] = memoryview(buf)[:got]
                buf = self._bufs[self._slot] = grown
            n = self._fill(memoryview(buf)[got:min(length, len(buf))])
            if not n:
                self._offset += got
                raise ImageError(f"truncated payload ({got} of {length} bytes)",
                                 offset=self._offset, record=where)
            got += n
        self._offset += length
        return memoryview(buf)[:length]

    def _fill(self, view: memoryview) -> int:
        if self._readinto is not None:
            return self._readinto(view) or 0
        data = self._source.read(len(view))
        view[:len(data)] = data
        return len(data)

    def _release_handed_out(self) -> None:
        """Invalidate the page data last handed out of the buffer about to be
        reused, so that code keeping it past its lifetime fails loudly instead
        of seeing another record."""
        handed_out = self._handed_out[self._slot]
        if handed_out is None:
            return
        try:
            handed_out.release()
        except BufferError:
            pass  # exported further (e.g. numpy): that holder keeps a live view
        self._handed_out[self._slot] = None


def _counts_text(counts: list[tuple[int, int]]) -> str:
    return "{" + ", ".join(f"{registry.type_name(t)}: {n}" for t, n in counts) + "}"
