"""Who is calling: peer credentials on the unix socket, certificates on TCP.

gRPC's Python server cannot tell who is on the other end of a unix socket
(its peer string for a unix client is just "unix:"), so the daemon owns the
public socket itself. ``UnixFront`` accepts each connection, reads the caller's
``SO_PEERCRED``, refuses callers that are neither root nor in the socket's
group, and splices the bytes to the real gRPC server, which listens on a
socket in a root-only directory. Each forwarding connection is bound to a
unique abstract name before it connects; gRPC reports that name as the peer,
and ``PeerTable`` maps it back to the caller's uid, gid and pid.

On TCP, gRPC itself enforces mutual TLS; the caller is the client
certificate's common name, trusted as an operator (uid 0).
"""

from __future__ import annotations

import fcntl
import grp
import os
import secrets
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from ckptd.errors import PermissionError_

log = structlog.get_logger(__name__)

# One splice moves at most this much per call; 1 MiB matches the image chunk
# size so a chunk crosses the front in one or two system calls. The pipe
# between the two splices is grown to match: at the default 64 KiB, each
# splice moved 64 KiB at most, 32 system calls and wake-ups per MiB.
SPLICE_BYTES = 1 << 20
F_SETPIPE_SZ = 1031
LISTEN_BACKLOG = 128


@dataclass(frozen=True)
class Peer:
    kind: str          # "unix", "tls" or "insecure-tcp"
    uid: int
    gid: int
    pid: int = 0
    name: str = ""     # certificate common name on TLS

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def describe(self) -> str:
        if self.kind == "unix":
            return f"uid={self.uid} pid={self.pid}"
        return f"{self.kind}:{self.name or '?'}"


class PeerTable:
    """Abstract socket name -> caller credentials, for live connections."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._peers: dict[str, Peer] = {}

    def add(self, key: str, peer: Peer) -> None:
        with self._lock:
            self._peers[key] = peer

    def remove(self, key: str) -> None:
        with self._lock:
            self._peers.pop(key, None)

    def resolve(self, context: grpc.ServicerContext) -> Peer:
        """The caller of the RPC behind ``context``; PermissionError_ if unknown."""
        peer = context.peer()
        if peer.startswith("unix-abstract:"):
            with self._lock:
                found = self._peers.get(peer[len("unix-abstract:"):])
            if found is not None:
                return found
        elif peer.startswith(("ipv4:", "ipv6:")):
            auth = context.auth_context()
            if auth.get("transport_security_type") == [b"ssl"]:
                names = auth.get("x509_common_name") or auth.get("x509_subject_alternative_name") or [b""]
                return Peer("tls", 0, 0, name=names[0].decode(errors="replace"))
            return Peer("insecure-tcp", 0, 0, name=peer)
        raise PermissionError_(f"unauthenticated caller {peer!r}: connect through the daemon's socket")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def caller_groups(pid: int) -> set[int]:
    """Supplementary groups of a live process (empty if it is already gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass  # the caller exited: it only loses the group check
    return set()


def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class UnixFront:
    """The public unix socket: authenticate, then splice to the gRPC server."""

    def __init__(self, path: Path, backend: Path, peers: PeerTable, group: str) -> None:
        self.path = path
        self.backend = backend
        self.peers = peers
        self.gid = group_id(group)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._prefix = f"ckptd-{os.getpid()}-{secrets.token_hex(4)}-"
        self._count = 0
        self._closing = False

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self._refuse_if_live()
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o117)  # created 0660, never briefly wider
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chown(self.path, 0, self.gid if self.gid is not None else 0)
        os.chmod(self.path, 0o660)
        sock.listen(LISTEN_BACKLOG)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="unix-front", daemon=True)
        self._thread.start()
        log.info("socket_listening", path=str(self.path), group=self.gid)

    def _refuse_if_live(self) -> None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            return  # stale socket of a dead daemon: safe to replace
        finally:
            probe.close()
        raise PermissionError_(f"another daemon is serving {self.path}; pick another --socket")

    def stop(self) -> None:
        self._closing = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected: closing is enough
            self._sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def allowed(self, uid: int, pid: int) -> bool:
        if uid == 0:
            return True
        return self.gid is not None and self.gid in caller_groups(pid) | {_primary_gid(pid)}

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closing:
                    return
                log.exception("accept_failed")
                continue
            try:
                self._handle(conn)
            except Exception:
                log.exception("connection_setup_failed")
                conn.close()

    def _handle(self, conn: socket.socket) -> None:
        pid, uid, gid = peer_credentials(conn)
        if not self.allowed(uid, pid):
            log.warning("caller_refused", uid=uid, pid=pid)
            conn.close()
            return
        self._count += 1
        key = f"{self._prefix}{self._count}"
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        upstream.bind(b"\0" + key.encode())
        upstream.connect(str(self.backend))
        self.peers.add(key, Peer("unix", uid, gid, pid))
        log.debug("caller_connected", uid=uid, pid=pid, conn=key)
        state = _Pair(conn, upstream, lambda: self.peers.remove(key))
        for src, dst in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=state.pump, args=(src, dst), daemon=True,
                             name=f"splice-{key}").start()


def _primary_gid(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_gid
    except OSError:
        return -1


class _Pair:
    """Two connected sockets spliced both ways; closed when both ways end."""

    def __init__(self, a: socket.socket, b: socket.socket, on_close) -> None:
        self._lock = threading.Lock()
        self._open = 2
        self._socks = (a, b)
        self._on_close = on_close

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, SPLICE_BYTES)
        except OSError:
            pass   # over /proc/sys/fs/pipe-max-size: smaller splices, still correct
        try:
            while True:
                n = os.splice(src.fileno(), w, SPLICE_BYTES)
                if n == 0:
                    break
                while n:
                    n -= os.splice(r, dst.fileno(), n)
        except OSError:
            pass  # a reset or a closed peer ends this direction like EOF does
        finally:
            os.close(r)
            os.close(w)
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # already gone
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._open -= 1
            last = self._open == 0
        if last:
            for s in self._socks:
                s.close()
            self._on_close()
