"""Throughput of ImageWriter and ImageReader over a file on /dev/shm.

    python tests/bench/bench_image.py [GiB] [--chunks]

Writes GiB (default 1) of page data in 64 MiB calls, reads it back with
ImageReader (touching each record's data with its length only: crc32 has
already read every byte), and prints GB/s for each direction, next to a plain
file write of the same bytes: on this VM a fresh tmpfs file costs the kernel
(and the host) page allocation, which dominates and varies from run to run. ``--chunks``
also times the gRPC path: writer -> ChunkSink -> ChunkReader -> reader.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from ckptd.image import ChunkReader, ChunkSink, ImageReader, ImageWriter, new_header

CALL = 64 << 20


def write_image(path: str, total: int, block: memoryview, mode: str = "wb") -> float:
    """``mode`` "wb": a fresh file (tmpfs allocates pages, the common case);
    "r+b": overwrite the previous image in place (only our cost + memcpy)."""
    start = time.perf_counter()
    with open(path, mode) as f, ImageWriter(f) as writer:
        writer.write_header(new_header(pid=os.getpid()))
        for i in range(total // CALL):
            writer.write_pages(i * CALL, block)
    return time.perf_counter() - start


def raw_write(path: str, total: int, block: memoryview) -> float:
    """Baseline: the same bytes with plain file writes, no framing or crc."""
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(total // CALL):
            f.write(block)
    return time.perf_counter() - start


def read_image(path: str) -> tuple[float, int]:
    start = time.perf_counter()
    seen = 0
    with open(path, "rb") as f:
        for record in ImageReader(f):
            seen += getattr(record, "data", b"").__len__()
    return time.perf_counter() - start, seen


def chunk_round_trip(total: int, block: memoryview) -> float:
    """Writer and reader in one thread through a bounded hand-off."""
    chunks: list[bytes] = []

    def produce():
        sink = ChunkSink(chunks.append)
        writer = ImageWriter(sink)
        writer.write_header(new_header())
        yield from _drain(chunks)
        for i in range(total // CALL):
            writer.write_pages(i * CALL, block)
            yield from _drain(chunks)
        writer.close()
        yield from _drain(chunks)

    start = time.perf_counter()
    ImageReader(ChunkReader(produce())).verify()
    return time.perf_counter() - start


def _drain(chunks: list[bytes]):
    yield from chunks
    chunks.clear()


def main() -> None:
    gib = float(sys.argv[1]) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else 1.0
    total = int(gib * (1 << 30)) // CALL * CALL
    block = memoryview(os.urandom(CALL))
    fd, path = tempfile.mkstemp(dir="/dev/shm", prefix="ckptd-bench-")
    os.close(fd)
    try:
        write_image(path, min(total, 256 << 20), block)   # warm up tmpfs and caches
        for trial in range(3):
            raw = raw_write(path, total, block)
            fresh = write_image(path, total, block)
            inplace = write_image(path, total, block, "r+b")
            r, seen = read_image(path)
            assert seen == total, (seen, total)
            print(f"trial {trial}: {total / 2**30:.2f} GiB  write {total / fresh / 1e9:.2f} GB/s "
                  f"(raw file write {total / raw / 1e9:.2f}), "
                  f"overwrite {total / inplace / 1e9:.2f} GB/s, read {total / r / 1e9:.2f} GB/s")
    finally:
        os.unlink(path)
    if "--chunks" in sys.argv:
        t = chunk_round_trip(total, block)
        print(f"chunks: writer -> ChunkSink -> ChunkReader -> reader "
              f"{total / t / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
