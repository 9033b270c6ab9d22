"""How the daemon starts Python processes of its own (container shims, engine
workers, their fork server): the same interpreter and the same ckptd.

``python -m MODULE`` puts the current directory first on sys.path, so a
daemon started inside a directory that holds a ``ckptd`` package would run
its children on that code instead of its own: a source checkout after
``pip install . && ckptd`` (the README's first command) gave engine workers
the checkout's ckptd, whose native stub is another file than the one the
daemon's containers run, and every restart was refused; any other directory
could hand a root daemon's workers code of someone else's. ``-P`` (Python
3.11+) leaves the directory out, and PYTHONPATH names where the daemon's own
package lives when the interpreter would not find it there by itself (a
source tree run with ``python -m ckptd.server.main``, an editable install).
"""

from __future__ import annotations

import os
import site
import sys
from collections.abc import Mapping
from pathlib import Path

import ckptd

# The directory that holds the daemon's ``ckptd`` package.
PACKAGE_ROOT = Path(ckptd.__file__).resolve().parent.parent


def python_argv(module: str) -> list[str]:
    """argv that runs ``module`` with this interpreter, cwd kept off sys.path."""
    return [sys.executable, "-P", "-m", module]


def python_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: our environment), with PYTHONPATH leading to our
    ckptd when the interpreter's own path would not."""
    env = dict(os.environ if base is None else base)
    if not _on_default_path(PACKAGE_ROOT):
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _on_default_path(root: Path) -> bool:
    # Installed packages live in site-packages, which every child finds by
    # itself; naming it in PYTHONPATH would put it before the standard library.
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return any(Path(d).resolve() == root for d in dirs if d)
