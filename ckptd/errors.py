"""The one error root of ckptd and its tree.

Every error that ckptd raises on purpose is a ``CkptdError``. The server maps
each kind to one gRPC status code (``ckptd/server/errors.py``); the kernel layer
raises plain ``OSError`` with errno, and the layers above wrap it with context
(``raise FreezeError(...) from e``).

    CkptdError                      base; ``.code`` names the gRPC status
    ├── UsageError                  you misused it (INVALID_ARGUMENT)
    │   └── ImageError              the image is bad: names record and offset
    ├── NotFoundError               no such container / pid (NOT_FOUND)
    ├── AlreadyExistsError          name taken (ALREADY_EXISTS)
    ├── StateError                  wrong state, e.g. not frozen (FAILED_PRECONDITION)
    ├── PermissionError_            caller may not do this (PERMISSION_DENIED)
    ├── TimeoutError_               the kernel did not get there in time (DEADLINE_EXCEEDED)
    ├── UnsupportedError            not implemented yet / kernel lacks a feature (UNIMPLEMENTED)
    ├── SystemError_                the outside broke: kernel, files (INTERNAL)
    └── BugError                    our bug: an invariant did not hold (INTERNAL)

Errors carry a message a person can act on, plus optional context (container
id, pid, fd) attached with ``context()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class CkptdError(Exception):
    """Root of every error ckptd raises on purpose."""

    code = "INTERNAL"

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context: dict[str, Any] = dict(context)

    def __str__(self) -> str:
        if not self.context:
            return self.message
        extra = ", ".join(f"{k}={v}" for k, v in self.context.items())
        # With a report under its first line, the context belongs to that line.
        first, newline, rest = self.message.partition("\n")
        return f"{first} ({extra}){newline}{rest}"


class UsageError(CkptdError):
    code = "INVALID_ARGUMENT"


class ImageError(UsageError):
    """A bad image. ``record`` and ``offset`` say where it went wrong."""

    def __init__(self, message: str, *, offset: int | None = None,
                 record: str | None = None, **context: Any) -> None:
        where = []
        if record is not None:
            where.append(f"record {record}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        full = f"bad image: {message}" + (f" at {', '.join(where)}" if where else "")
        super().__init__(full, **context)
        self.offset = offset
        self.record = record


class NotFoundError(CkptdError):
    code = "NOT_FOUND"


class AlreadyExistsError(CkptdError):
    code = "ALREADY_EXISTS"


class StateError(CkptdError):
    code = "FAILED_PRECONDITION"


class PermissionError_(CkptdError):
    code = "PERMISSION_DENIED"


class TimeoutError_(CkptdError):
    code = "DEADLINE_EXCEEDED"


class UnsupportedError(CkptdError):
    code = "UNIMPLEMENTED"


class SystemError_(CkptdError):
    code = "INTERNAL"


class BugError(CkptdError):
    code = "INTERNAL"


@contextlib.contextmanager
def context(**ctx: Any) -> Iterator[None]:
    """Attach context (container=, pid=, fd=...) to any CkptdError raised inside.

    Keys already set by an inner ``context()`` win: the innermost knows best.
    """
    try:
        yield
    except CkptdError as e:
        for k, v in ctx.items():
            e.context.setdefault(k, v)
        raise
