"""The image header as the dumping machine fills it in.

Restore compares these facts (kernel, arch, page size) with its own machine
before touching anything, so they are taken from the system, not the caller.
"""

from __future__ import annotations

import importlib.metadata
import mmap
import os
import time
from collections.abc import Mapping

from ckptd.image import format as fmt
from ckptd.v1 import image_pb2


def new_header(*, container_id: str = "", container_name: str = "", pid: int = 0,
               labels: Mapping[str, str] | None = None) -> image_pb2.ImageHeader:
    """A header describing this machine, now, and the given source."""
    uname = os.uname()
    return image_pb2.ImageHeader(
        format_version=fmt.FORMAT_VERSION,
        created_at=time.time_ns(),
        tool_version=_tool_version(),
        kernel_release=uname.release,
        arch=uname.machine,
        hostname=uname.nodename,
        source=image_pb2.ImageSource(container_id=container_id,
                                     container_name=container_name, pid=pid),
        labels=dict(labels or {}),
        page_size=mmap.PAGESIZE,
    )


def _tool_version() -> str:
    try:
        return importlib.metadata.version("ckptd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"  # running from a source tree that was never installed
