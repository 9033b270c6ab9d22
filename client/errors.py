"""The errors of the client library, and the one place gRPC failures map to them.

Every failure a ``Client`` method raises on purpose is a ``ClientError``; its
``code`` is the name of the gRPC status (``"NOT_FOUND"``...) and its message is
the server's, or one written here when the transport itself failed, so that a
caller can print ``str(error)`` to a person as is.

    ClientError                  base; ``.code``, ``.message``
    ├── InvalidArgument          INVALID_ARGUMENT; also a bad address or TLS setup
    ├── NotFound                 NOT_FOUND: no such container / pid
    ├── AlreadyExists            ALREADY_EXISTS: e.g. the name is taken
    ├── FailedPrecondition       FAILED_PRECONDITION: wrong state, e.g. not frozen
    ├── PermissionDenied         PERMISSION_DENIED
    │   └── Unauthenticated      UNAUTHENTICATED (TLS identity not accepted)
    ├── Unavailable              UNAVAILABLE: daemon down or unreachable
    ├── DeadlineExceeded         DEADLINE_EXCEEDED: the daemon or the kernel was too slow
    ├── Unimplemented            UNIMPLEMENTED: not in this daemon / kernel
    ├── Cancelled                CANCELLED
    ├── ResourceExhausted        RESOURCE_EXHAUSTED
    └── Internal                 INTERNAL, UNKNOWN, DATA_LOSS and anything else

Local file errors (reading an image, writing a checkpoint) stay ``OSError``:
they are the caller's files, not the daemon's answer.
"""

from __future__ import annotations

import re

import grpc


class ClientError(Exception):
    """Root of every error the client library raises on purpose."""

    code = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidArgument(ClientError):
    code = "INVALID_ARGUMENT"


class NotFound(ClientError):
    code = "NOT_FOUND"


class AlreadyExists(ClientError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ClientError):
    code = "FAILED_PRECONDITION"


class PermissionDenied(ClientError):
    code = "PERMISSION_DENIED"


class Unauthenticated(PermissionDenied):
    code = "UNAUTHENTICATED"


class Unavailable(ClientError):
    code = "UNAVAILABLE"


class DeadlineExceeded(ClientError):
    code = "DEADLINE_EXCEEDED"


class Unimplemented(ClientError):
    code = "UNIMPLEMENTED"


class Cancelled(ClientError):
    code = "CANCELLED"


class ResourceExhausted(ClientError):
    code = "RESOURCE_EXHAUSTED"


class Internal(ClientError):
    code = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}

# How grpc's transport words a failure to reach or keep the connection. Only
# details that start so are rewritten: an UNAVAILABLE the daemon sent itself
# (e.g. "cannot reach the migration destination ...") keeps its own message.
_TRANSPORT_PREFIX = re.compile(
    r"(failed to connect|connections to all backends failing|dns resolution failed"
    r"|empty address list|socket closed|connection reset|broken pipe|goaway"
    r"|recvmsg|sendmsg|ssl handshake|handshake failed|tls handshake)"
)

# The words a person should read instead of grpc's. The first match wins.
_TRANSPORT_REASONS: tuple[tuple[str, str], ...] = (
    (r"handshake failed|ssl_error|certificate", "TLS handshake failed"),
    (r"no such file or directory", "no such socket"),
    (r"connection refused", "connection refused"),
    (r"permission denied", "permission denied on the socket"),
    (r"connection reset|socket closed|broken pipe|end of tcp stream", "connection closed"),
    (r"dns resolution failed|name resolution|domain name not found", "cannot resolve the host name"),
    (r"timeout occurred|timed out|deadline", "connection timed out"),
    (r"failed to connect", "cannot connect"),
)

_HINTS = {
    "TLS handshake failed": "check the CA, the client certificate and key, and that the daemon speaks TLS",
    "permission denied on the socket": "run as root or as a member of the daemon's group",
}

# grpc's own wording for a deadline that ran out on our side (not the daemon's).
_LOCAL_DEADLINE = "deadline exceeded"


def from_rpc_error(error: grpc.RpcError, address: str, timeout: float | None = None) -> ClientError:
    """Translate a failed call into the ``ClientError`` a person can act on.

    ``address`` is the daemon's address as the user gave it, named in messages
    about the transport; ``timeout`` is the deadline the call had, if any.
    """
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or ""
    cls = _BY_CODE.get(code, Internal)
    name = code.name if code is not None else "UNKNOWN"
    if code is grpc.StatusCode.UNAVAILABLE:
        reason = transport_reason(details)
        if reason is not None:
            return Unavailable(_unreachable(address, reason, details))
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and details.strip().lower() == _LOCAL_DEADLINE:
        after = f" within {timeout:g} s" if timeout else " in time"
        return DeadlineExceeded(f"ckptd at {address} did not answer{after} (raise the timeout?)")
    return cls(details or f"ckptd failed with {name}", code=name)


def transport_reason(details: str) -> str | None:
    """The short reason when ``details`` says the connection itself failed."""
    low = details.lower().strip()
    if not _TRANSPORT_PREFIX.match(low):
        return None
    for pattern, reason in _TRANSPORT_REASONS:
        if re.search(pattern, low):
            return reason
    return "connection failed"


def _unreachable(address: str, reason: str, details: str) -> str:
    hint = _HINTS.get(reason, "is the daemon running?")
    message = f"cannot reach ckptd at {address}: {reason} ({hint})"
    if reason == "TLS handshake failed":
        # The TLS library's own reason (e.g. CERTIFICATE_VERIFY_FAILED) is the
        # only clue to which side's certificate was wrong.
        found = re.search(r"OPENSSL_internal:([A-Z_]+)", details)
        if found:
            message += f": {found.group(1)}"
    return message
