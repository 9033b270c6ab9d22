"""Turning the kernel layer's OSError into ckptd errors, in one place."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import Any

from ckptd.errors import SystemError_, TimeoutError_, UnsupportedError


@contextlib.contextmanager
def kernel_call(what: str, **context: Any) -> Iterator[None]:
    """Any OSError inside becomes a ckptd error saying what we were doing.

    Callers that expect a particular errno (a timeout with its own message, a
    process that is gone) catch it themselves, inside this block.
    """
    try:
        yield
    except TimeoutError as e:
        raise TimeoutError_(f"{what}: {e.strerror}", **context) from e
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENOSYS):
            raise UnsupportedError(f"{what}: {e.strerror}", **context) from e
        detail = e.strerror or str(e)
        target = f" ({e.filename})" if e.filename else ""
        raise SystemError_(f"{what}: {detail}{target}", **context) from e
