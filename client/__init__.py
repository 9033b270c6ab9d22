"""The Python client library of ckptd, and ckptctl built on it (talks only gRPC).

    from ckptd_client import Client, NotFound

    with Client() as ckptd:                      # $CKPTD_ADDRESS or the local socket
        c = ckptd.run(["sleep", "100"], name="napper")
        ckptd.checkpoint_to_file("napper.img", ref=c.id, leave_running=True)
        ckptd.kill(c.id, timeout=5)

Every method returns the generated protobuf messages of ``ckptd.v1.api_pb2``
and raises a ``ClientError`` subclass (see ``ckptd_client.errors``).
"""

import os

# grpc's C core writes its own log lines to stderr (a failed TLS handshake is
# logged, then reported to us as UNAVAILABLE anyway). The library turns every
# failure into an exception with a readable message, and ckptctl promises one
# line per error, so grpc's lines are noise by default. It must be set before
# grpc is first imported; an explicit GRPC_VERBOSITY still wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from .address import ADDRESS_ENV, DEFAULT_SOCKET, Address, TlsFiles, parse_address  # noqa: E402
from .client import HEALTH_SERVICE, Client, Container, Operation, StatusResponse  # noqa: E402
from .errors import (  # noqa: E402
    AlreadyExists,
    Cancelled,
    ClientError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from .signals import parse_signal, signal_name  # noqa: E402

__all__ = [
    "ADDRESS_ENV",
    "DEFAULT_SOCKET",
    "HEALTH_SERVICE",
    "Address",
    "AlreadyExists",
    "Cancelled",
    "Client",
    "ClientError",
    "Container",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "Operation",
    "PermissionDenied",
    "ResourceExhausted",
    "StatusResponse",
    "TlsFiles",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "parse_address",
    "parse_signal",
    "signal_name",
]
