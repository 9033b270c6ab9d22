"""The client library against an in-process fake daemon on a unix socket."""

from __future__ import annotations

import io
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from ckptd.v1 import api_pb2
from ckptd_client import (
    AlreadyExists,
    Client,
    ClientError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    parse_address,
)
from ckptd_client.testing import FakeCkptd, fake_daemon, fake_image


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Not tmp_path: a unix socket path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="ckc") as d:
        yield d


@pytest.fixture
def daemon(sock_dir: str) -> Iterator[tuple[str, FakeCkptd]]:
    path = os.path.join(sock_dir, "ckptd.sock")
    with fake_daemon(path) as fake:
        yield path, fake


@pytest.fixture
def client(daemon: tuple[str, FakeCkptd]) -> Iterator[Client]:
    with Client(daemon[0], timeout=5) as c:
        yield c


# -- addresses ---------------------------------------------------------------------

@pytest.mark.parametrize("text, path", [
    ("/run/ckptd/ckptd.sock", "/run/ckptd/ckptd.sock"),
    ("./ckptd.sock", "./ckptd.sock"),
    ("unix:/run/x.sock", "/run/x.sock"),
    ("unix:///run/x.sock", "/run/x.sock"),
])
def test_unix_addresses(text: str, path: str) -> None:
    a = parse_address(text)
    assert a.unix_path == path and a.is_unix and a.target.startswith("unix:/")


@pytest.mark.parametrize("text, host, port, loopback", [
    ("localhost:7443", "localhost", 7443, True),
    ("127.0.0.1:1", "127.0.0.1", 1, True),
    ("[::1]:7443", "::1", 7443, True),
    ("10.0.0.2:7443", "10.0.0.2", 7443, False),
    ("ckptd.example.org:7443", "ckptd.example.org", 7443, False),
])
def test_tcp_addresses(text: str, host: str, port: int, loopback: bool) -> None:
    a = parse_address(text)
    assert (a.host, a.port, a.is_loopback()) == (host, port, loopback)


@pytest.mark.parametrize("text", ["", "ckptd.sock", "host:", "host:http", "host:70000", "unix:"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_address(text)


def test_default_address_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTD_ADDRESS", "/tmp/elsewhere.sock")
    with Client() as c:
        assert c.address.unix_path == "/tmp/elsewhere.sock"
    monkeypatch.delenv("CKPTD_ADDRESS")
    with Client() as c:
        assert c.address.unix_path == "/run/ckptd/ckptd.sock"


def test_insecure_refused_off_loopback() -> None:
    with pytest.raises(InvalidArgument, match="only allowed to loopback"):
        Client("10.0.0.2:7443", insecure=True)
    Client("127.0.0.1:7443", insecure=True).close()


def test_tcp_needs_client_certificate() -> None:
    with pytest.raises(InvalidArgument, match="mutual TLS"):
        Client("10.0.0.2:7443")
    with pytest.raises(InvalidArgument, match="cannot read the client key"):
        Client("10.0.0.2:7443", tls_cert="/nonexistent/c.pem", tls_key="/nonexistent/k.pem")


# -- lifecycle ---------------------------------------------------------------------------

def test_run_sends_everything(client: Client, daemon: tuple[str, FakeCkptd]) -> None:
    c = client.run(["sleep", "5"], name="nap", env={"A": "1"}, cwd="/tmp", hostname="h",
                   network="new", tty=True)
    assert c.name == "nap" and c.state == api_pb2.CONTAINER_STATE_RUNNING
    name, req = daemon[1].requests[-1]
    assert name == "Run"
    assert list(req.argv) == ["sleep", "5"] and list(req.env) == ["A=1"]
    assert (req.cwd, req.hostname, req.network, req.tty) == ("/tmp", "h", api_pb2.NETWORK_MODE_NEW, True)


def test_run_validates_locally(client: Client) -> None:
    with pytest.raises(InvalidArgument):
        client.run([])
    with pytest.raises(InvalidArgument, match="KEY=VALUE"):
        client.run(["true"], env=["NOEQUALS"])
    with pytest.raises(InvalidArgument, match="network"):
        client.run(["true"], network="bridge")


def test_list_and_status(client: Client) -> None:
    assert {c.id for c in client.list()} == {"c0ffee01", "c0ffee02", "c0ffee03"}
    assert {c.id for c in client.list(running_only=True)} == {"c0ffee01", "c0ffee02"}
    assert client.status("web").container.id == "c0ffee01"
    assert client.status().daemon.freezer_backend == "cgroup2"


def test_state_changes(client: Client, daemon: tuple[str, FakeCkptd]) -> None:
    assert client.freeze("web", timeout=3).state == api_pb2.CONTAINER_STATE_FROZEN
    assert daemon[1].requests[-1][1].timeout_seconds == 3
    with pytest.raises(FailedPrecondition, match="not running"):
        client.freeze("web")
    assert client.thaw("web").state == api_pb2.CONTAINER_STATE_RUNNING
    assert client.kill("web", signal=9, timeout=2).exit_signal == 9
    assert client.delete("web") == "c0ffee01"
    with pytest.raises(NotFound, match="no container 'web'"):
        client.status("web")


def test_logs(client: Client) -> None:
    assert b"".join(client.logs("web")) == b"line one\nline two\n"


def test_health(client: Client, sock_dir: str) -> None:
    assert client.health() is True
    with Client(os.path.join(sock_dir, "none.sock"), timeout=2) as down:
        assert down.health() is False


# -- errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
    (grpc.StatusCode.NOT_FOUND, NotFound),
    (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists),
    (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
    (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
    (grpc.StatusCode.UNIMPLEMENTED, Unimplemented),
    (grpc.StatusCode.INTERNAL, Internal),
    (grpc.StatusCode.UNKNOWN, Internal),
    (grpc.StatusCode.UNAVAILABLE, Unavailable),
])
def test_status_codes_map_to_errors(client: Client, daemon: tuple[str, FakeCkptd],
                                    code: grpc.StatusCode, cls: type[ClientError]) -> None:
    daemon[1].fail["Status"] = (code, "the daemon's own words")
    with pytest.raises(cls) as info:
        client.status()
    assert info.value.code == code.name
    # Server messages pass through untouched, even for UNAVAILABLE.
    assert str(info.value) == "the daemon's own words"


def test_daemon_down_message(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "missing.sock")
    with Client(path, timeout=2) as c, pytest.raises(Unavailable) as info:
        c.list()
    assert str(info.value) == (
        f"cannot reach ckptd at {path}: no such socket (is the daemon running?)")


def test_connection_refused_message(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # bound, never listening: connect() is refused
    try:
        with Client(path, timeout=2) as c, pytest.raises(Unavailable, match="connection refused"):
            c.list()
    finally:
        s.close()


def _self_signed(tmp_path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 that is its own CA, and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ckptd-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_mutual_tls(tmp_path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from ckptd.v1 import api_pb2_grpc

    cert, key = _self_signed(tmp_path)
    pem = (open(key, "rb").read(), open(cert, "rb").read())
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    api_pb2_grpc.add_CkptdServicer_to_server(FakeCkptd(image_bytes=10), server)
    creds = grpc.ssl_server_credentials([pem], root_certificates=pem[1],
                                        require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", tls_cert=cert, tls_key=key, tls_ca=cert, timeout=5) as c:
            assert len(c.list()) == 3
    finally:
        server.stop(grace=None)


def test_tls_handshake_failure_message(tmp_path) -> None:
    # A TCP listener that answers a TLS hello with plain HTTP.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(64)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    cert, key = _self_signed(tmp_path)
    try:
        with Client(f"127.0.0.1:{port}", tls_cert=cert, tls_key=key, tls_ca=cert, timeout=3) as c:
            with pytest.raises(Unavailable) as info:
                c.list()
    finally:
        listener.close()
    assert str(info.value).startswith(f"cannot reach ckptd at 127.0.0.1:{port}: TLS handshake failed")


# -- checkpoint / restart -------------------------------------------------------------------

def test_checkpoint_streams_the_image(client: Client, daemon: tuple[str, FakeCkptd]) -> None:
    assert b"".join(client.checkpoint("web")) == daemon[1].image
    req = daemon[1].requests[-1][1]
    assert req.WhichOneof("target") == "id" and not req.leave_running
    assert b"".join(client.checkpoint(pid=77, leave_running=True)) == daemon[1].image
    req = daemon[1].requests[-1][1]
    assert (req.pid, req.leave_running) == (77, True)


def test_checkpoint_acks_only_a_kill_and_only_after_the_consumer_has_everything(
        client: Client, daemon: tuple[str, FakeCkptd]) -> None:
    fake = daemon[1]
    order: list[str] = []
    got = b""
    for chunk in client.checkpoint("web", before_ack=lambda: order.append(
            f"durable with {len(fake.checkpoint_acks)} acks")):
        got += chunk
        order.append("chunk")
    assert got == fake.image
    assert order[-1] == "durable with 0 acks" and set(order[:-1]) == {"chunk"}
    assert fake.checkpoint_acks == [len(fake.image)]
    b"".join(client.checkpoint("web", leave_running=True))
    assert fake.checkpoint_acks == [len(fake.image)], "a tree left running is not waited on"


def test_a_failed_before_ack_sends_no_ack(client: Client, daemon: tuple[str, FakeCkptd]) -> None:
    def disk_full() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        b"".join(client.checkpoint("web", before_ack=disk_full))
    # The daemon saw the call end without an ack (or cancelled while it
    # waited for one): it resumes the tree.
    fake = daemon[1]
    deadline = time.monotonic() + 5
    while fake.checkpoint_acks != [None] and not fake.checkpoint_cancelled.is_set():
        assert time.monotonic() < deadline, fake.checkpoint_acks
        time.sleep(0.01)
    assert fake.checkpoint_acks in ([], [None])


def test_checkpoint_to_file_is_in_place_before_the_ack(
        client: Client, daemon: tuple[str, FakeCkptd], tmp_path) -> None:
    dest = tmp_path / "web.img"
    seen: list[bool] = []
    original = Client._checkpoint_stream

    def watching(self, request, before_ack):
        def check_then_ack():
            before_ack()
            seen.append(dest.exists() and dest.stat().st_size == len(daemon[1].image))
        return original(self, request, check_then_ack)

    Client._checkpoint_stream = watching  # type: ignore[method-assign]
    try:
        client.checkpoint_to_file(dest, ref="web")
    finally:
        Client._checkpoint_stream = original  # type: ignore[method-assign]
    assert seen == [True], "the image is whole at its path when the daemon may kill"
    assert daemon[1].checkpoint_acks == [len(daemon[1].image)]


def test_checkpoint_needs_exactly_one_target(client: Client) -> None:
    with pytest.raises(InvalidArgument):
        client.checkpoint()
    with pytest.raises(InvalidArgument):
        client.checkpoint("web", pid=1)


def test_checkpoint_to_file(client: Client, daemon: tuple[str, FakeCkptd], tmp_path) -> None:
    seen: list[int] = []
    dest = tmp_path / "web.img"
    size = client.checkpoint_to_file(dest, ref="web", progress=seen.append)
    assert dest.read_bytes() == daemon[1].image and size == len(daemon[1].image)
    assert seen[-1] == size and seen == sorted(seen)
    assert not daemon[1].checkpoint_cancelled.is_set()
    assert oct(dest.stat().st_mode & 0o777) == "0o600"  # memory contents are private
    assert os.listdir(tmp_path) == ["web.img"]


def test_failed_checkpoint_leaves_no_file(client: Client, daemon: tuple[str, FakeCkptd], tmp_path) -> None:
    daemon[1].fail_checkpoint_after = 2 * 1024 * 1024
    with pytest.raises(Internal, match="dumping memory"):
        client.checkpoint_to_file(tmp_path / "web.img", ref="web")
    assert os.listdir(tmp_path) == []
    with pytest.raises(NotFound):
        client.checkpoint_to_file(tmp_path / "x.img", ref="nope")
    assert os.listdir(tmp_path) == []


def test_interrupted_checkpoint_leaves_no_file_and_cancels(
        client: Client, daemon: tuple[str, FakeCkptd], tmp_path) -> None:
    def ctrl_c(done: int) -> None:
        if done >= 2**21:
            raise KeyboardInterrupt

    daemon[1].image = fake_image(32 * 2**20)  # more than grpc's buffers hold
    with pytest.raises(KeyboardInterrupt):
        client.checkpoint_to_file(tmp_path / "web.img", ref="web", progress=ctrl_c)
    assert os.listdir(tmp_path) == []
    assert daemon[1].checkpoint_cancelled.wait(5)


def test_checkpoint_into_a_directory_fails_before_starting(
        client: Client, daemon: tuple[str, FakeCkptd], tmp_path) -> None:
    with pytest.raises(IsADirectoryError):
        client.checkpoint_to_file(tmp_path, ref="web")
    assert not any(name == "Checkpoint" for name, _ in daemon[1].requests)


def test_closing_the_checkpoint_stream_cancels_it(client: Client, daemon: tuple[str, FakeCkptd]) -> None:
    daemon[1].image = fake_image(32 * 2**20)  # more than grpc's buffers hold
    stream = client.checkpoint("web")
    next(stream)
    stream.close()
    assert daemon[1].checkpoint_cancelled.wait(5)


def test_restart_sends_options_first_then_all_bytes(client: Client, daemon: tuple[str, FakeCkptd]) -> None:
    data = daemon[1].image
    # One oversized chunk and some small ones: the client re-chunks to <= 1 MiB.
    c = client.restart([data[:2_500_000], b"", data[2_500_000:2_500_010], data[2_500_010:]], name="again")
    record = daemon[1].restarts[-1]
    assert record.options_first and record.options.name == "again"
    assert bytes(record.data) == data
    assert record.messages == 1 + 5  # 1 MiB + 1 MiB + rest of 2.5 MB, the 10 bytes, the tail
    assert c.name == "again"


def test_restart_from_file_and_file_object(client: Client, daemon: tuple[str, FakeCkptd], tmp_path) -> None:
    image = tmp_path / "web.img"
    image.write_bytes(daemon[1].image)
    seen: list[int] = []
    client.restart_from_file(image, progress=seen.append)
    assert bytes(daemon[1].restarts[-1].data) == daemon[1].image
    assert seen[-1] == len(daemon[1].image)
    client.restart_from_file(io.BytesIO(b"abc"), name="tiny")
    assert bytes(daemon[1].restarts[-1].data) == b"abc"


def test_restart_error_reading_the_image_is_raised(client: Client, daemon: tuple[str, FakeCkptd]) -> None:
    def broken() -> Iterator[bytes]:
        yield b"x" * 1000
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        client.restart(broken())
    # The call was cancelled, not closed: grpc's server may still present it
    # as an ended stream, which a real daemon rejects by the missing trailer.
    assert all(len(r.data) <= 1000 for r in daemon[1].restarts)


def test_restart_aborted_by_the_daemon_mid_stream(client: Client, daemon: tuple[str, FakeCkptd]) -> None:
    daemon[1].fail_restart_after = 2**20
    with pytest.raises(Internal, match="restoring memory"):
        client.restart_from_file(io.BytesIO(daemon[1].image))
    # The client stopped sending soon after: flow control, not the whole image.
    assert len(daemon[1].restarts[-1].data) < len(daemon[1].image)


def test_restart_error_from_daemon(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="bad image"):
        client.restart([])


def test_migrate_refuses_a_malformed_destination(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="neither a unix socket path"):
        client.migrate("web", "elsewhere")


def test_run_refuses_non_utf8(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="UTF-8"):
        client.run(["cat", b"\xff".decode("utf-8", "surrogateescape")])


def test_migrate(client: Client, daemon: tuple[str, FakeCkptd]) -> None:
    moved = client.migrate("web", "10.0.0.2:7443", leave_running=True)
    assert moved.id == "d0ffee01"
    req = daemon[1].requests[-1][1]
    assert (req.destination, req.leave_running) == ("10.0.0.2:7443", True)


def test_migrate_reports_progress(client: Client, daemon: tuple[str, FakeCkptd],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ckptd_client.client.POLL_SECONDS", 0.02)
    daemon[1].migrate_seconds = 0.3
    daemon[1].operations.append(api_pb2.Operation(
        id="op-9", kind=api_pb2.OPERATION_KIND_MIGRATE, container_id="c0ffee01",
        phase="sending image", bytes_done=10))
    seen: list[api_pb2.Operation] = []
    assert client.migrate("web", "10.0.0.2:7443", progress=seen.append).id == "d0ffee01"
    assert seen and seen[0].phase == "sending image"


def test_checkpoint_chunks_are_bytes(client: Client) -> None:
    assert all(type(chunk) is bytes for chunk in client.checkpoint("web"))
