"""Compile the native sources of ckptd/native into ckptd/native/bin.

Called by setup.py's build step (``pip install .``); runnable by hand too:
``python ckptd/native/build.py``. Needs a C compiler (``cc``, or ``$CC``).

Freestanding programs (they run as, or inside, a restored task) are built with
no libc, no stack protector (no TLS canary to set up), static and
position-independent, so that they can be placed anywhere and carry nothing
the target did not have.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

FREESTANDING = [
    "-O2", "-nostdlib", "-static-pie", "-fPIE", "-ffreestanding",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-builtin",
    "-Wall", "-Werror",
]

# (output name, sources, flags)
PROGRAMS = [
    ("ckptd-stub", ["stub.c"], FREESTANDING),
]


def build_all(src_dir: str) -> None:
    cc = shlex.split(os.environ.get("CC", "cc"))
    out_dir = os.path.join(src_dir, "bin")
    os.makedirs(out_dir, exist_ok=True)
    for name, sources, flags in PROGRAMS:
        out = os.path.join(out_dir, name)
        cmd = [*cc, *flags, "-o", out, *(os.path.join(src_dir, s) for s in sources)]
        try:
            subprocess.run(cmd, check=True)
        except FileNotFoundError:
            sys.exit(f"ckptd: C compiler {cc[0]!r} not found; install gcc (or set CC)")
        except subprocess.CalledProcessError as e:
            sys.exit(f"ckptd: compiling {name} failed ({e.returncode}): {shlex.join(cmd)}")


if __name__ == "__main__":
    build_all(os.path.dirname(os.path.abspath(__file__)))
