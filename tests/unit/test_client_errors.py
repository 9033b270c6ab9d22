"""The one mapping from gRPC failures to ClientError, on captured grpc wording."""

from __future__ import annotations

import grpc
import pytest

from ckptd_client.errors import DeadlineExceeded, Internal, Unavailable, from_rpc_error


class FakeCall(grpc.RpcError, grpc.Call):
    """What grpc raises: an RpcError that is also a Call (code, details)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    # The rest of grpc.Call is not used by the mapping.
    def initial_metadata(self): return None  # noqa: E704
    def trailing_metadata(self): return None  # noqa: E704
    def is_active(self): return False  # noqa: E704
    def time_remaining(self): return None  # noqa: E704
    def cancel(self): return False  # noqa: E704
    def add_callback(self, callback): return False  # noqa: E704


# Captured from grpcio 1.85 failing to connect.
REFUSED_UNIX = ("failed to connect to all addresses; last error: FAILED_PRECONDITION: "
                "unix:/run/ckptd/ckptd.sock: connect failed: addr: unix:/run/ckptd/ckptd.sock "
                "error: Connection refused")
REFUSED_TCP = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
               "Failed to connect to remote host: Connection refused")
TLS = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.2:7443: Tls handshake "
       "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:"
       "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: self signed certificate")
EACCES = ("failed to connect to all addresses; last error: FAILED_PRECONDITION: unix:/run/x.sock: "
          "connect failed: addr: unix:/run/x.sock error: Permission denied")


@pytest.mark.parametrize("details, address, message", [
    (REFUSED_UNIX, "/run/ckptd/ckptd.sock",
     "cannot reach ckptd at /run/ckptd/ckptd.sock: connection refused (is the daemon running?)"),
    (REFUSED_TCP, "127.0.0.1:1",
     "cannot reach ckptd at 127.0.0.1:1: connection refused (is the daemon running?)"),
    (TLS, "10.0.0.2:7443",
     "cannot reach ckptd at 10.0.0.2:7443: TLS handshake failed (check the CA, the client "
     "certificate and key, and that the daemon speaks TLS): CERTIFICATE_VERIFY_FAILED"),
    (EACCES, "/run/x.sock",
     "cannot reach ckptd at /run/x.sock: permission denied on the socket "
     "(run as root or as a member of the daemon's group)"),
    ("Socket closed", "/run/x.sock",
     "cannot reach ckptd at /run/x.sock: connection closed (is the daemon running?)"),
])
def test_transport_failures_are_rewritten(details: str, address: str, message: str) -> None:
    error = from_rpc_error(FakeCall(grpc.StatusCode.UNAVAILABLE, details), address)
    assert isinstance(error, Unavailable) and error.code == "UNAVAILABLE"
    assert str(error) == message


def test_daemon_sent_unavailable_keeps_its_words() -> None:
    words = "cannot reach the migration destination 10.0.0.9:7443: connection refused"
    error = from_rpc_error(FakeCall(grpc.StatusCode.UNAVAILABLE, words), "/run/x.sock")
    assert isinstance(error, Unavailable) and str(error) == words


def test_local_deadline_names_the_timeout() -> None:
    error = from_rpc_error(FakeCall(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
                           "/run/x.sock", 30.0)
    assert isinstance(error, DeadlineExceeded)
    assert str(error) == "ckptd at /run/x.sock did not answer within 30 s (raise the timeout?)"
    words = "cgroup did not report frozen within 10 s"
    assert str(from_rpc_error(FakeCall(grpc.StatusCode.DEADLINE_EXCEEDED, words), "x/y")) == words


@pytest.mark.parametrize("code", [grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNKNOWN])
def test_other_codes_are_internal_with_their_name(code: grpc.StatusCode) -> None:
    error = from_rpc_error(FakeCall(code, ""), "x/y")
    assert isinstance(error, Internal) and error.code == code.name
    assert str(error) == f"ckptd failed with {code.name}"
