"""The image format: one self-describing byte stream, on disk and on the wire.

This package owns framing, checksums, version checks and decoding for
inspection; the record schema lives in ``proto/ckptd/v1/image.proto``.

Layout (all integers little-endian)::

    preamble   magic    8 bytes   b"CKPTIMG\\x00"
               version  u32       FORMAT_VERSION (1)
    record     type     u32       a RecordType value
               flags    u32       bits 0-3 compression (0 = none); the rest
                                  reserved, must be 0
               length   u64       payload bytes
               crc      u32       zlib.crc32 over type, flags, length (the 16
                                  bytes above), then the payload
               payload  length bytes
    ...

Records: first an ImageHeader (RECORD_TYPE_HEADER), last a Trailer
(RECORD_TYPE_TRAILER), nothing after it. Metadata records are protobuf
messages, one class per type (``registry.py``). Page records
(RECORD_TYPE_PAGES) are raw: ``vaddr u64, vma_id u64``, then the bytes that
start at ``vaddr``. The trailer counts the records before it per type, their
payload bytes and page bytes, and holds the sha256 of the preamble and every
record header before it: as each header carries its payload's crc, that digest
covers every byte at the cost of hashing 20 bytes per record, not gigabytes.

Public API::

    ImageWriter(sink)              write_header, write_message, write_pages, close
    ImageReader(source)            read_header, iterate records, verify
    ChunkSink(emit), ChunkReader(chunks), iter_chunks(file)    gRPC chunking
    register(record_type, message_class)                       new record kinds
    new_header(...)                a header describing this machine
    ckptd.image.inspect            inspect_image(stream), summarize(result)
"""

from ckptd.image.chunks import (CHUNK_SIZE, ChunkReader, ChunkSink, decode_bytes_field,
                                encode_bytes_field, iter_chunks)
from ckptd.image.format import FORMAT_VERSION, MAGIC, Compression
from ckptd.image.header import new_header
from ckptd.image.reader import ImageReader, MessageRecord, PageRecord, Record
from ckptd.image.registry import RecordType, message_class, register
from ckptd.image.writer import ImageWriter

__all__ = [
    "CHUNK_SIZE", "ChunkReader", "ChunkSink", "Compression", "FORMAT_VERSION",
    "ImageReader", "ImageWriter", "MAGIC", "MessageRecord", "PageRecord", "Record",
    "RecordType", "decode_bytes_field", "encode_bytes_field", "iter_chunks", "message_class",
    "new_header", "register",
]
