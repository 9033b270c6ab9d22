"""Native parts of ckptd: freestanding C compiled by the package build.

``binary(name)`` gives the path of a compiled program, or raises a clear error
naming the missing file when the package was not built (e.g. run from a bare
source tree without ``pip install .``). ``crc32`` is zlib.crc32, computed by
the extension module built from crc32.c (several times faster), or by zlib
where that was not built.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

from ckptd.errors import SystemError_

try:
    from ckptd.native._crc32 import accelerated as _accelerated
    from ckptd.native._crc32 import crc32
except ImportError:   # a bare source tree: same results, zlib's speed
    from zlib import crc32  # noqa: F401 - this module's crc32

    def _accelerated() -> bool:
        return False


def crc32_accelerated() -> bool:
    """Whether ``crc32`` uses the CPU's carry-less multiply."""
    return _accelerated()

BIN_DIR = Path(__file__).resolve().parent / "bin"


def binary(name: str) -> Path:
    path = BIN_DIR / name
    if not path.is_file():
        raise SystemError_(
            f"native program {name!r} is missing at {path}: build the package with "
            "`pip install .` (it compiles ckptd/native/*.c)"
        )
    return path


STUB = "ckptd-stub"


def symbols(path: Path) -> dict[str, tuple[int, int]]:
    """``name -> (vaddr, file offset)`` of the symbols of an ELF64 file."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise SystemError_(f"{path} is not an ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    out: dict[str, tuple[int, int]] = {}
    for _name, stype, _fl, _addr, offset, size, link, _info, _al, entsize in sections:
        if stype != 2:   # SHT_SYMTAB
            continue
        str_off = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            st_name, _inf, _oth, shndx, value, _size = struct.unpack_from("<IBBHQQ", data, pos)
            if not st_name or shndx == 0 or shndx >= shnum:
                continue
            end = data.index(b"\0", str_off + st_name)
            name = data[str_off + st_name:end].decode()
            sec = sections[shndx]
            out[name] = (value, sec[4] + value - sec[3])
    return out


@functools.cache
def stub_blob() -> tuple[bytes, int]:
    """The position-independent code the restorer copies into a task:
    (bytes starting with "syscall; int3", offset of the batch runner)."""
    path = binary(STUB)
    syms = symbols(path)
    try:
        start, start_off = syms["ckptd_blob"]
        runner, _ = syms["ckptd_runner"]
        end, _ = syms["ckptd_blob_end"]
    except KeyError as e:
        raise SystemError_(f"{path} lacks the symbol {e}: rebuild the package") from e
    code = path.read_bytes()[start_off:start_off + end - start]
    return code, runner - start
