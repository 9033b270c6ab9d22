"""Where the daemon is: parsing an address, and opening a gRPC channel to it.

An address with a "/" in it (or starting with "unix:") is the path of the
daemon's unix socket, where the daemon identifies the caller by its uid; any
other address is ``host:port`` over TCP, where the caller identifies itself by
a client certificate (mutual TLS). Plain TCP is allowed only to loopback, for
tests and ssh tunnels: anywhere else it would hand root's powers to anyone on
the network.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

import grpc

from .errors import InvalidArgument

DEFAULT_SOCKET = "/run/ckptd/ckptd.sock"
ADDRESS_ENV = "CKPTD_ADDRESS"

# Image chunks are about 1 MiB; 16 MiB leaves room for a daemon that sends
# bigger ones and for a large List, without letting a broken peer make us
# buffer without bound.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


@dataclass(frozen=True)
class Address:
    """A parsed daemon address; ``text`` is what the user wrote, for messages."""

    text: str
    unix_path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def is_unix(self) -> bool:
        return self.unix_path is not None

    @property
    def target(self) -> str:
        """The address in grpc's target syntax."""
        if self.unix_path is not None:
            return "unix:" + os.path.abspath(self.unix_path)
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"

    def is_loopback(self) -> bool:
        if self.is_unix:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host or "").is_loopback
        except ValueError:
            return False  # a host name: we do not resolve it to decide trust


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for mutual TLS: our certificate and key, and the CA of the daemon."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    def any(self) -> bool:
        return bool(self.cert or self.key or self.ca)


def default_address() -> str:
    """The address to use when none is given: $CKPTD_ADDRESS, then the local socket."""
    return os.environ.get(ADDRESS_ENV) or DEFAULT_SOCKET


def parse_address(text: str) -> Address:
    """Parse a unix socket path, ``unix:PATH`` or ``host:port``."""
    text = text.strip()
    if not text:
        raise InvalidArgument("empty daemon address")
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if path.startswith("///"):
            path = path[2:]  # unix:///abs/path, as grpc writes it
        if not path:
            raise InvalidArgument(f"daemon address {text!r} names no socket path")
        return Address(text, unix_path=path)
    if "/" in text:
        return Address(text, unix_path=text)
    host, port = _split_host_port(text)
    return Address(text, host=host, port=port)


def _split_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [::1]:7443
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = text.rpartition(":")
    if not host or not sep or not port_text:
        raise InvalidArgument(
            f"daemon address {text!r} is neither a unix socket path (with a '/') nor host:port"
        )
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise InvalidArgument(f"daemon address {text!r} has a bad port {port_text!r}")
    return host, port


def open_channel(address: Address, tls: TlsFiles, *, insecure: bool = False) -> grpc.Channel:
    """A channel to ``address``: unix socket, mutual TLS, or plain loopback TCP."""
    if address.is_unix:
        # The socket's file mode and SO_PEERCRED do the job of TLS here, so
        # TLS flags are ignored rather than refused: one CKPTD_ADDRESS switch
        # moves a script between local and remote.
        return grpc.insecure_channel(address.target, options=_CHANNEL_OPTIONS)
    if insecure:
        if not address.is_loopback():
            raise InvalidArgument(
                f"refusing plain TCP to {address.text}: insecure connections are only "
                "allowed to loopback (localhost, 127.0.0.1, ::1); use mutual TLS"
            )
        return grpc.insecure_channel(address.target, options=_CHANNEL_OPTIONS)
    if not (tls.cert and tls.key):
        raise InvalidArgument(
            f"TCP address {address.text} needs mutual TLS: give a client certificate "
            "and key (and the daemon's CA), or use insecure mode for loopback"
        )
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_pem(tls.ca, "CA certificate", _CERT_MARK) if tls.ca else None,
        private_key=_read_pem(tls.key, "client key", _KEY_MARK),
        certificate_chain=_read_pem(tls.cert, "client certificate", _CERT_MARK),
    )
    return grpc.secure_channel(address.target, credentials, options=_CHANNEL_OPTIONS)


# grpc only notices a wrong file when it connects, and then reports it as an
# unreachable daemon; a look for the PEM armour catches the usual mix-ups early.
_CERT_MARK = b"-----BEGIN CERTIFICATE-----"
_KEY_MARK = b"PRIVATE KEY-----"


def _read_pem(path: str, what: str, mark: bytes) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InvalidArgument(f"cannot read the {what} {path}: {e.strerror or e}") from e
    if mark not in data:
        raise InvalidArgument(f"the {what} {path} is not in PEM format (no {mark.decode()!r})")
    return data
