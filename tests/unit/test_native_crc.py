"""The image checksum's native implementation (ckptd/native/crc32.c) gives
zlib.crc32's results for every length, alignment and start value, and its
folding constants are what the CRC-32 polynomial makes them."""

from __future__ import annotations

import os
import random
import re
import zlib
from pathlib import Path

import pytest

from ckptd import native

SOURCE = Path(native.__file__).with_name("crc32.c")
P = 0x104C11DB7   # CRC-32, normal form


def test_the_extension_is_built_and_accelerated_here() -> None:
    from ckptd.native import _crc32   # built by `pip install .`
    assert native.crc32 is _crc32.crc32
    # This machine's CPU has PCLMULQDQ (MACHINE.md); elsewhere the table runs.
    assert native.crc32_accelerated() == ("pclmulqdq" in Path("/proc/cpuinfo").read_text())


@pytest.mark.parametrize("seed", range(4))
def test_same_as_zlib_for_every_length_offset_and_start(seed: int) -> None:
    rng = random.Random(seed)
    blob = rng.randbytes(4096 + 64)
    for length in list(range(0, 300)) + [1023, 1024, 4095, 4096, 4097]:
        offset = rng.randrange(0, 64)
        data = memoryview(blob)[offset:offset + length]
        start = rng.getrandbits(32) if length % 3 else 0
        assert native.crc32(data, start) == zlib.crc32(data, start), (length, offset, start)


def test_large_buffers_and_buffer_kinds() -> None:
    data = os.urandom((8 << 20) + 13)
    want = zlib.crc32(data)
    assert native.crc32(data) == want
    assert native.crc32(bytearray(data)) == want
    assert native.crc32(memoryview(data)) == want
    # Chained, as records are checksummed in parts.
    assert native.crc32(data[1000:], native.crc32(data[:1000])) == want
    with pytest.raises(TypeError):
        native.crc32("text")   # type: ignore[arg-type]


def _reflected_x_pow_mod(n: int) -> int:
    r = 1
    for _ in range(n):
        r <<= 1
        if r >> 32:
            r ^= P
    return int(f"{r:032b}"[::-1], 2) << 1


def _reflected_x_pow_div(n: int) -> int:
    num, q = 1 << n, 0
    while num.bit_length() >= P.bit_length():
        shift = num.bit_length() - P.bit_length()
        q |= 1 << shift
        num ^= P << shift
    return int(f"{q:033b}"[::-1], 2)


def test_folding_constants_come_from_the_polynomial() -> None:
    text = SOURCE.read_text()
    consts = {int(h, 16) for h in re.findall(r"0x([0-9A-F]{9})LL", text)}
    want = {_reflected_x_pow_mod(4 * 128 - 32), _reflected_x_pow_mod(4 * 128 + 32),
            _reflected_x_pow_mod(128 - 32), _reflected_x_pow_mod(128 + 32),
            _reflected_x_pow_mod(64), _reflected_x_pow_div(64),
            int(f"{P:033b}"[::-1], 2)}
    assert consts == want
