"""The one place where ckptd errors become gRPC status codes."""

from __future__ import annotations

import grpc

from ckptd.errors import CkptdError

_CODES: dict[str, grpc.StatusCode] = {c.name: c for c in grpc.StatusCode}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller should see for ``error``."""
    if isinstance(error, CkptdError):
        return _CODES.get(error.code, grpc.StatusCode.INTERNAL), str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
