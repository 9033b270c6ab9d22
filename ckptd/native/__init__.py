"""Native parts of ckptd: freestanding C compiled by the package build.

``binary(name)`` gives the path of a compiled program, or raises a clear error
naming the missing file when the package was not built (e.g. run from a bare
source tree without ``pip install .``).
"""

from __future__ import annotations

from pathlib import Path

from ckptd.errors import SystemError_

BIN_DIR = Path(__file__).resolve().parent / "bin"


def binary(name: str) -> Path:
    path = BIN_DIR / name
    if not path.is_file():
        raise SystemError_(
            f"native program {name!r} is missing at {path}: build the package with "
            "`pip install .` (it compiles ckptd/native/*.c)"
        )
    return path
