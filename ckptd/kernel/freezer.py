"""Picks the freezer backend: cgroup v2 when usable, else cgroup v1.

``open_freezer`` also creates the daemon's root cgroup, because on cgroup2
whether the kernel can freeze shows only in a non-root cgroup (cgroup.freeze,
Linux 5.2+).
"""

from __future__ import annotations

import errno
from pathlib import Path

from ckptd.kernel.cgroup1 import FreezerV1
from ckptd.kernel.cgroup2 import FreezerV2
from ckptd.kernel.cgroupfs import Freezer

KINDS = ("auto", "cgroup2", "cgroup1")


def make_freezer(name: str, v1_mount: Path, v2_mount: Path) -> Freezer:
    """The backend called ``name``, without probing (for cgroups made earlier)."""
    if name == FreezerV2.name:
        return FreezerV2(v2_mount)
    if name == FreezerV1.name:
        return FreezerV1(v1_mount)
    raise OSError(errno.EINVAL, f"unknown freezer backend {name!r}", name)


def open_freezer(kind: str, root: str, v1_mount: Path, v2_mount: Path) -> Freezer:
    """The backend for ``kind`` ("auto", "cgroup2", "cgroup1"), with the root
    cgroup ``<mount>/<root>`` created. OSError(ENOTSUP) if none is usable."""
    if kind not in KINDS:
        raise OSError(errno.EINVAL, f"freezer must be one of {', '.join(KINDS)}", kind)
    if kind in ("auto", "cgroup2") and FreezerV2.usable(v2_mount):
        if _ensure_root(v2_mount / root, probe="cgroup.freeze"):
            return FreezerV2(v2_mount)
    if kind == "cgroup2":
        raise OSError(errno.ENOTSUP, "no usable cgroup2 freezer", str(v2_mount))
    if FreezerV1.usable(v1_mount):
        if _ensure_root(v1_mount / root, probe="freezer.state"):
            return FreezerV1(v1_mount)
    raise OSError(errno.ENOTSUP, "no usable cgroup freezer (v2 or v1)",
                  f"{v2_mount}, {v1_mount}")


def _ensure_root(path: Path, probe: str) -> bool:
    created = False
    try:
        path.mkdir(parents=True)
        created = True
    except FileExistsError:
        pass
    if (path / probe).exists():
        return True
    if created:
        path.rmdir()  # leave nothing behind for a backend we will not use
    return False
