"""Adapters between the image byte stream and gRPC's chunked messages.

``Checkpoint`` streams an image out as ``ImageChunk`` messages and ``Restart``
receives one the same way: ChunkSink cuts what ImageWriter writes into
chunks, ChunkReader turns chunks of any size back into a file for
ImageReader. Neither holds more than one chunk.

``encode_bytes_field``/``decode_bytes_field`` put a chunk into, and take it
out of, the wire form of a message whose only field set is one ``bytes``
field (``ImageChunk.data``, ``RestartRequest.data``), so the gRPC
(de)serializers of the image streams do not go through protobuf objects:
building, serializing, parsing and ``.data`` each copied the chunk into
freshly allocated memory, half the CPU of a transfer.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from ckptd.errors import BugError

Bytes = bytes | bytearray | memoryview

# gRPC refuses messages over 4 MiB by default; 1 MiB leaves room for framing
# and is large enough that per-message cost (a few µs) is lost in the copy.
CHUNK_SIZE = 1 << 20


_WIRE_LEN = 2            # protobuf wire type of a length-delimited field
_MAX_TAG_AND_LENGTH = 1 + 10   # a one-byte tag (field < 16) and a 64-bit varint


def encode_bytes_field(field: int, data: Bytes) -> bytes:
    """The serialized message whose only field is ``field`` = ``data``."""
    if not 1 <= field < 16:
        raise BugError(f"field {field} needs a multi-byte tag")
    view = _byte_view(data)
    head = bytearray([field << 3 | _WIRE_LEN])
    n = view.nbytes
    while n > 0x7F:
        head.append(n & 0x7F | 0x80)
        n >>= 7
    head.append(n)
    return b"".join((head, view))


def decode_bytes_field(raw: bytes, field: int) -> memoryview | None:
    """``field``'s bytes, as a view of ``raw``, if ``raw`` is exactly the
    message that ``encode_bytes_field`` makes; None for anything else (other
    or more fields, an empty message, a malformed one): parse that with protobuf."""
    if not raw or raw[0] != field << 3 | _WIRE_LEN:
        return None
    length = shift = 0
    for i in range(1, min(len(raw), _MAX_TAG_AND_LENGTH)):
        length |= (raw[i] & 0x7F) << shift
        shift += 7
        if not raw[i] & 0x80:
            return memoryview(raw)[i + 1:] if len(raw) - i - 1 == length else None
    return None


class _Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


def _byte_view(data: Bytes) -> memoryview:
    view = memoryview(data)
    return view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")


class ChunkSink:
    """A sink for ImageWriter that hands out ``bytes`` chunks of ``chunk_size``
    (the last one shorter) to ``emit``, e.g. ``queue.put`` or ``list.append``.

    Chunks are copies: the writer's buffers may change after ``write`` returns.
    """

    def __init__(self, emit: Callable[[bytes], object], chunk_size: int = CHUNK_SIZE) -> None:
        if chunk_size <= 0:
            raise BugError(f"chunk size must be positive, not {chunk_size}")
        self._emit = emit
        self._size = chunk_size
        self._pending = bytearray()
        self.bytes_emitted = 0

    def write(self, data: Bytes) -> int:
        view = _byte_view(data)
        total = view.nbytes
        if self._pending:
            take = min(total, self._size - len(self._pending))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) == self._size:
                self._send(bytes(self._pending))
                self._pending.clear()
        while view.nbytes >= self._size:
            self._send(bytes(view[:self._size]))
            view = view[self._size:]
        if view.nbytes:
            self._pending += view
        return total

    def flush(self) -> None:
        """Emit what is pending as a short chunk (ImageWriter.close calls this)."""
        if self._pending:
            self._send(bytes(self._pending))
            self._pending.clear()

    def _send(self, chunk: bytes) -> None:
        self.bytes_emitted += len(chunk)
        self._emit(chunk)


class ChunkReader(io.RawIOBase):
    """A readable file over an iterable of byte chunks of any size.

    ``readinto`` fills the whole buffer unless the chunks run out, so a
    short read means end of stream. Errors of the iterable (a cancelled RPC)
    propagate unchanged.
    """

    def __init__(self, chunks: Iterable[Bytes]) -> None:
        super().__init__()
        self._chunks = iter(chunks)
        self._current = memoryview(b"")
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Bytes) -> int:  # type: ignore[override]
        out = _byte_view(buffer)
        done = 0
        while done < out.nbytes:
            if not self._current.nbytes:
                if not self._next_chunk():
                    break
                continue
            n = min(self._current.nbytes, out.nbytes - done)
            out[done:done + n] = self._current[:n]
            self._current = self._current[n:]
            done += n
        return done

    def _next_chunk(self) -> bool:
        if self._eof:
            return False
        chunk = next(self._chunks, None)
        if chunk is None:
            self._eof = True
            return False
        self._current = _byte_view(chunk)
        return True


def iter_chunks(source: _Readable, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Read ``source`` (a file, a pipe from the dump worker) as chunks of at
    most ``chunk_size`` bytes, for a server-streaming RPC."""
    if chunk_size <= 0:
        raise BugError(f"chunk size must be positive, not {chunk_size}")
    while chunk := source.read(chunk_size):
        yield chunk
