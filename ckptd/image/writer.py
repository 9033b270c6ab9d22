"""ImageWriter: turns header, metadata messages and page data into one stream.

Streaming and copy-free for page data: each record's 20-byte header goes out,
then the caller's buffer itself. The trailer is written only by a clean
``close()``, so an image cut short by an error is always detectably incomplete.
"""

from __future__ import annotations

import collections
import hashlib
from collections import Counter
from concurrent import futures
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, cast

import structlog
from google.protobuf.message import Message

from ckptd.errors import BugError, SystemError_
from ckptd.image import format as fmt
from ckptd.image import registry
from ckptd.v1 import image_pb2

log = structlog.get_logger(__name__)

Bytes = bytes | bytearray | memoryview


class Sink(Protocol):
    """Where the bytes go: a file, a socket file, a ChunkSink ..."""

    def write(self, data: Bytes, /) -> int | None: ...


class LendingSink(Sink, Protocol):
    """A sink that can lend the next bytes of the stream to be filled in place
    (a mapped file): page data then goes from the task straight into it."""

    def take(self, n: int, /) -> memoryview | None:
        """The next ``n`` bytes of the stream, now written as far as the
        position goes; None if they cannot be lent (write them instead)."""


@dataclass(frozen=True)
class PageSlots:
    """Room lent by the sink for the page records of one range: fill each of
    ``data`` (the records' data, in address order), then ``seal_pages``."""

    vaddr: int
    vma_id: int
    data: list[memoryview]
    heads: list[memoryview]   # each record's header and page header, written at sealing


class ImageWriter:
    """Write one image to ``sink``: ``write_header``, records, ``close``.

    The sink must not keep the buffers it is handed past its ``write`` call
    (files and ChunkSink copy); page data is passed through uncopied.
    """

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._digest = hashlib.sha256()
        self._counts: Counter[int] = Counter()
        self._payload_bytes = 0
        self._page_bytes = 0
        self._bytes_written = 0
        self._started = False
        self._closed = False
        self._pool: futures.ThreadPoolExecutor | None = None
        self._sealing: collections.deque[futures.Future] = collections.deque()

    @property
    def bytes_written(self) -> int:
        """Bytes handed to the sink so far (for progress reporting)."""
        return self._bytes_written

    @property
    def page_bytes(self) -> int:
        """Raw page bytes written so far."""
        return self._page_bytes

    @property
    def records_written(self) -> int:
        return sum(self._counts.values())

    def write_header(self, header: image_pb2.ImageHeader) -> None:
        """Start the image: preamble, then the header record.

        ``format_version`` is filled in here: the writer knows what it writes.
        """
        if self._started:
            raise BugError("image header written twice")
        if header.format_version not in (0, fmt.FORMAT_VERSION):
            raise BugError(f"this writer writes format version {fmt.FORMAT_VERSION}, "
                           f"not {header.format_version}")
        own = image_pb2.ImageHeader()
        own.CopyFrom(header)
        own.format_version = fmt.FORMAT_VERSION
        preamble = fmt.PREAMBLE.pack(fmt.MAGIC, fmt.FORMAT_VERSION)
        self._digest.update(preamble)
        self._write(preamble)
        self._started = True
        self._write_record(registry.HEADER, own.SerializeToString())

    def write_message(self, record_type: int, msg: Message) -> None:
        """Write one metadata record; ``msg`` must be the type's registered class."""
        self._check_open()
        if record_type in (registry.HEADER, registry.TRAILER):
            raise BugError(f"{registry.type_name(record_type)} is written by the writer itself")
        cls = registry.message_class(record_type)
        if cls is None:
            raise BugError(f"record type {registry.type_name(record_type)} has no message class")
        if not isinstance(msg, cls):
            raise BugError(f"record type {registry.type_name(record_type)} carries "
                           f"{cls.DESCRIPTOR.full_name}, not {msg.DESCRIPTOR.full_name}")
        payload = msg.SerializeToString()
        if len(payload) > fmt.MAX_MESSAGE_PAYLOAD:
            raise BugError(f"{registry.type_name(record_type)} message of {len(payload)} "
                           f"bytes exceeds the {fmt.MAX_MESSAGE_PAYLOAD} byte bound")
        self._write_record(record_type, payload)

    def write_pages(self, vaddr: int, data: Bytes, vma_id: int = 0) -> None:
        """Write the bytes at ``vaddr`` (any length, empty included).

        Cut into records of at most ``PAGE_RECORD_DATA`` bytes, each carrying
        the address of its own first byte. Pass large buffers (several
        records' worth) for speed: the checksum of the next record is then
        computed on the other core while this one is being written.
        """
        self._check_open()
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        try:
            fmt.check_range(vaddr, view.nbytes)
            fmt.check_u64(vma_id)
        except ValueError as e:
            raise BugError(f"bad page range: {e}") from e
        step = fmt.PAGE_RECORD_DATA
        if view.nbytes <= step:
            self._write_page_record(vaddr, vma_id, view, _page_crc(vaddr, vma_id, view))
            return
        pool = self._crc_pool()
        pending = pool.submit(_page_crc, vaddr, vma_id, view[:step])
        try:
            for start in range(0, view.nbytes, step):
                crc = pending.result()
                following = start + step
                if following < view.nbytes:
                    pending = pool.submit(_page_crc, vaddr + following, vma_id,
                                          view[following:following + step])
                self._write_page_record(vaddr + start, vma_id, view[start:start + step], crc)
        finally:
            # Never return while the pool still reads the caller's buffer.
            futures.wait([pending])

    def page_slots(self, vaddr: int, nbytes: int, vma_id: int = 0) -> PageSlots | None:
        """Room in the sink itself for the page records of [vaddr, vaddr +
        nbytes), cut as ``write_pages`` cuts them; None if the sink lends no
        room (then ``write_pages``). The stream is unreadable until
        ``seal_pages`` has been called on them."""
        take = getattr(self._sink, "take", None)
        if take is None or nbytes <= 0:
            return None
        self._check_started()   # not _check_open: sealing runs on meanwhile
        try:
            fmt.check_range(vaddr, nbytes)
            fmt.check_u64(vma_id)
        except ValueError as e:
            raise BugError(f"bad page range: {e}") from e
        step = fmt.PAGE_RECORD_DATA
        head = fmt.RECORD_HEADER_SIZE + fmt.PAGE_HEADER.size
        sizes = [min(step, nbytes - at) for at in range(0, nbytes, step)]
        room = take(head * len(sizes) + nbytes)
        if room is None:
            return None
        data, heads, at = [], [], 0
        for n in sizes:
            heads.append(room[at:at + head])
            data.append(room[at + head:at + head + n])
            at += head + n
        return PageSlots(vaddr, vma_id, data, heads)

    def seal_pages(self, slots: PageSlots) -> None:
        """Checksum the filled records of ``slots`` and write their headers,
        on the writer's thread: the caller fills the next slots meanwhile.
        The slots' memory must stay valid until the writer is closed."""
        self._check_started()
        self._sealing.append(self._crc_pool().submit(self._seal, slots))
        # One sealing behind the caller is all the overlap there is to have.
        while len(self._sealing) > 1:
            self._sealing.popleft().result()

    def close(self) -> None:
        """Write the trailer. Idempotent; the sink is the caller's to close."""
        if self._closed:
            return
        self._check_open()
        trailer = image_pb2.Trailer(
            counts=[image_pb2.RecordCount(type=cast(image_pb2.RecordType, t), count=n)
                    for t, n in sorted(self._counts.items())],
            payload_bytes=self._payload_bytes,
            page_bytes=self._page_bytes,
            digest=self._digest.digest(),
        )
        self._write_record(registry.TRAILER, trailer.SerializeToString())
        self._closed = True
        self._shutdown_pool()
        flush = getattr(self._sink, "flush", None)
        if flush is not None:
            flush()
        log.debug("image_written", bytes=self._bytes_written, page_bytes=self._page_bytes,
                  records=self.records_written)

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            # No trailer: the reader must see this image as incomplete.
            self._closed = True
            self._sealing.clear()   # the pool's shutdown below waits for them
            self._shutdown_pool()
            log.warning("image_abandoned", bytes=self._bytes_written, error=repr(exc))

    def _check_open(self) -> None:
        self._check_started()
        # Whatever comes next goes after the sealed pages, in the digest too.
        while self._sealing:
            self._sealing.popleft().result()

    def _check_started(self) -> None:
        if not self._started:
            raise BugError("image header must be written first")
        if self._closed:
            raise BugError("image already closed")

    def _seal(self, slots: PageSlots) -> None:
        vaddr = slots.vaddr
        for data, head in zip(slots.data, slots.heads):
            crc = _page_crc(vaddr, slots.vma_id, data)
            length = fmt.PAGE_HEADER.size + data.nbytes
            header = fmt.RecordHeader(registry.PAGES, fmt.Compression.NONE, length, crc).pack()
            head[:fmt.RECORD_HEADER_SIZE] = header
            head[fmt.RECORD_HEADER_SIZE:] = fmt.PAGE_HEADER.pack(vaddr, slots.vma_id)
            self._account(registry.PAGES, header, length)
            self._page_bytes += data.nbytes
            self._bytes_written += fmt.RECORD_HEADER_SIZE + length
            vaddr += data.nbytes

    def _write_page_record(self, vaddr: int, vma_id: int, data: memoryview, crc: int) -> None:
        length = fmt.PAGE_HEADER.size + data.nbytes
        header = fmt.RecordHeader(registry.PAGES, fmt.Compression.NONE, length, crc).pack()
        self._account(registry.PAGES, header, length)
        self._page_bytes += data.nbytes
        self._write(header + fmt.PAGE_HEADER.pack(vaddr, vma_id))
        if data.nbytes:
            self._write(data)

    def _crc_pool(self) -> futures.ThreadPoolExecutor:
        # One thread: crc32 and file writes both release the GIL, so on two
        # cores checksumming record n+1 while writing record n nearly
        # doubles throughput on a fresh tmpfs file (measured: 0.9-1.7 -> 2.1 GB/s).
        if self._pool is None:
            self._pool = futures.ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix="ckptd-image-crc")
        return self._pool

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _write_record(self, record_type: int, payload: bytes) -> None:
        flags = fmt.Compression.NONE
        crc = fmt.record_crc(record_type, flags, len(payload), payload)
        header = fmt.RecordHeader(record_type, flags, len(payload), crc).pack()
        if record_type != registry.TRAILER:
            self._account(record_type, header, len(payload))
        # One write for small records: fewer syscalls on unbuffered sinks.
        self._write(header + payload)

    def _account(self, record_type: int, header: bytes, length: int) -> None:
        self._digest.update(header)
        self._counts[record_type] += 1
        self._payload_bytes += length

    def _write(self, data: Bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._sink.write(view)
            # Buffered files return the full length (callable-backed sinks
            # may return None); raw files and sockets may take less. Sinks
            # are blocking, so None never means "would block" here.
            if n is None or n >= view.nbytes:
                break
            if n <= 0:
                raise SystemError_(f"image sink accepted no bytes ({n!r})")
            view = view[n:]
        self._bytes_written += len(data)


def _page_crc(vaddr: int, vma_id: int, data: memoryview) -> int:
    length = fmt.PAGE_HEADER.size + data.nbytes
    return fmt.record_crc(registry.PAGES, fmt.Compression.NONE, length,
                          fmt.PAGE_HEADER.pack(vaddr, vma_id), data)
