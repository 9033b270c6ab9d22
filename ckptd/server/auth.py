"""Who is calling: peer credentials on the unix socket, certificates on TCP.

gRPC's Python server cannot tell who is on the other end of a unix socket
(its peer string for a unix client is just "unix:"), so the daemon owns the
public socket itself. ``UnixFront`` accepts each connection, reads the caller's
``SO_PEERCRED``, refuses callers that are neither root nor in the socket's
group, and splices the bytes to the real gRPC server, which listens on a
socket in a root-only directory. Each forwarding connection is bound to a
unique abstract name before it connects; gRPC reports that name as the peer,
and ``PeerTable`` maps it back to the caller's uid, gid and pid.

Next to the public socket, ``<socket>.fd`` lets a local caller hand over a
file it opened itself (an image to write or read), so that the image can go
between the engine and the file without crossing gRPC. ``LocalFiles`` keeps
each such descriptor under a single-use token bound to the caller's uid and
pid; the Checkpoint or Restart call of that same process names the token.
The daemon never opens a path a caller names: the caller's own permissions
applied when it opened the file.

On TCP, gRPC itself enforces mutual TLS; the caller is the client
certificate's common name, trusted as an operator (uid 0).
"""

from __future__ import annotations

import fcntl
import grp
import os
import secrets
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from ckptd.errors import CkptdError, PermissionError_, UsageError

log = structlog.get_logger(__name__)

# One splice moves at most this much per call; 1 MiB matches the image chunk
# size so a chunk crosses the front in one or two system calls. The pipe
# between the two splices is grown to match: at the default 64 KiB, each
# splice moved 64 KiB at most, 32 system calls and wake-ups per MiB.
SPLICE_BYTES = 1 << 20
F_SETPIPE_SZ = 1031
LISTEN_BACKLOG = 128
# A handed-over file waits this long for the call that uses it: a client
# starts that call at once, and a client killed in between must not keep a
# descriptor open in the daemon for longer.
TOKEN_SECONDS = 60.0
# Expired tokens are also looked for this often when no caller comes by.
SWEEP_SECONDS = 5.0
# A caller that connects to the side channel has this long to send its byte
# and descriptor (each connection has a thread of its own meanwhile).
HAND_OVER_SECONDS = 5.0
# Room for more descriptors than the one expected, so that a message with
# several is seen whole and refused, every one of them closed.
MAX_HANDED_FDS = 4
FD_SOCKET_SUFFIX = ".fd"
# The byte sent with a descriptor: what the caller means to do with it.
IMAGE_OUT, IMAGE_IN = "w", "r"


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


def caller_allowed(uid: int, pid: int, gid: int | None) -> bool:
    """Root, or a member of the socket's group."""
    if uid == 0:
        return True
    return gid is not None and gid in caller_groups(pid) | {_primary_gid(pid)}


def listen_unix(path: Path, gid: int | None) -> socket.socket:
    """A listening socket at ``path``, mode 0660, owned by root and ``gid``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o117)  # created 0660, never briefly wider
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chown(path, 0, gid if gid is not None else 0)
    os.chmod(path, 0o660)
    sock.listen(LISTEN_BACKLOG)
    return sock


class UnixFront:
    """The public unix socket: authenticate, then splice to the gRPC server."""

    def __init__(self, path: Path, backend: Path, peers: PeerTable, group: str,
                 files: LocalFiles | None = None) -> None:
        self.path = path
        self.backend = backend
        self.peers = peers
        self.gid = group_id(group)
        self.fd_front = (None if files is None else
                         FdFront(path.with_name(path.name + FD_SOCKET_SUFFIX), files, self.gid))
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
        self._sock = listen_unix(self.path, self.gid)
        if self.fd_front is not None:
            try:
                self.fd_front.start()
            except OSError as e:
                # E.g. a socket path at the length limit: clients then stream.
                log.warning("fd_socket_unavailable", path=str(self.fd_front.path), error=str(e))
                self.fd_front = None
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
        _close_listener(self._sock, self.path)
        if self.fd_front is not None:
            self.fd_front.stop()

    def allowed(self, uid: int, pid: int) -> bool:
        return caller_allowed(uid, pid, self.gid)

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


def _close_listener(sock: socket.socket | None, path: Path) -> None:
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected: closing is enough
        sock.close()
    try:
        path.unlink()
    except FileNotFoundError:
        pass


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


# -- files handed over by local callers ----------------------------------------


@dataclass(frozen=True)
class _Handed:
    fd: int
    mode: str        # IMAGE_OUT or IMAGE_IN
    uid: int
    pid: int
    expires: float


def check_handed_fd(fd: int, mode: str) -> None:
    """UsageError unless ``fd`` is a regular file open for ``mode``.

    Only regular files: a pipe, socket or device could make the engine block
    or talk to something the caller could not reach itself. O_PATH is refused
    because it carries no read or write right of its own. Set-id or
    capability-bearing files are refused for writing: the kernel strips those
    privileges when an ordinary process writes the file, but not when root
    (the engine) does, so a writable set-id file of another user would keep
    its privilege with the caller's bytes in it.
    """
    mode_bits = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode_bits):
        raise UsageError("a handed-over image file must be a regular file")
    if mode == IMAGE_OUT and (mode_bits & (stat.S_ISUID | stat.S_ISGID)
                              or _has_xattr(fd, "security.capability")):
        raise UsageError("refusing to write an image into a set-id or capability-bearing file")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    access = flags & os.O_ACCMODE
    wanted = (os.O_WRONLY, os.O_RDWR) if mode == IMAGE_OUT else (os.O_RDONLY, os.O_RDWR)
    if flags & os.O_PATH or access not in wanted:
        raise UsageError("the handed-over image file is not open for "
                         + ("writing" if mode == IMAGE_OUT else "reading"))


def _has_xattr(fd: int, name: str) -> bool:
    try:
        os.getxattr(fd, name)
        return True
    except OSError:
        return False   # ENODATA, or a file system without xattrs: none there


class LocalFiles:
    """Descriptors handed over by local callers, each under a single-use token.

    A token is consumed by the first call that names it, whoever that is: one
    that leaked is then worthless. Every descriptor is closed when its call
    ends, when it expires, or when the table closes.
    """

    def __init__(self, ttl: float = TOKEN_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._files: dict[str, _Handed] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

    def add(self, fd: int, mode: str, uid: int, pid: int) -> str:
        """Keep ``fd`` (ours from now on, closed if refused); its token."""
        try:
            if mode not in (IMAGE_OUT, IMAGE_IN):
                raise UsageError(f"unknown hand-over mode {mode!r}")
            check_handed_fd(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        self.sweep()
        token = secrets.token_hex(16)
        with self._lock:
            self._files[token] = _Handed(fd, mode, uid, pid, self._clock() + self._ttl)
        log.debug("local_file_handed", uid=uid, pid=pid, mode=mode)
        return token

    def take(self, token: str, mode: str, caller: Peer) -> int:
        """The descriptor under ``token``, now the caller's to close."""
        if caller.kind != "unix":
            raise PermissionError_("local file tokens work only on the daemon's unix socket")
        with self._lock:
            handed = self._files.pop(token, None)
        self.sweep()
        if handed is None:
            raise UsageError("unknown local file token: tokens are single-use and expire "
                             f"{self._ttl:g} s after the file was handed over")
        try:
            if handed.expires <= self._clock():
                raise UsageError(f"the local file token expired ({self._ttl:g} s after "
                                 "the file was handed over)")
            if (handed.uid, handed.pid) != (caller.uid, caller.pid):
                raise PermissionError_("the local file token was handed over by another "
                                       "process: only its own process may use it")
            if handed.mode != mode:
                raise UsageError("the local file token was handed over for "
                                 + ("reading" if handed.mode == IMAGE_IN else "writing"))
        except BaseException:
            os.close(handed.fd)
            raise
        return handed.fd

    def discard(self, token: str) -> None:
        with self._lock:
            handed = self._files.pop(token, None)
        if handed is not None:
            os.close(handed.fd)

    def sweep(self) -> None:
        """Close what expired unused."""
        now = self._clock()
        with self._lock:
            gone = [t for t, h in self._files.items() if h.expires <= now]
            handed = [self._files.pop(t) for t in gone]
        for h in handed:
            os.close(h.fd)
        if handed:
            log.info("local_files_expired", count=len(handed))

    def close(self) -> None:
        with self._lock:
            handed, self._files = list(self._files.values()), {}
        for h in handed:
            os.close(h.fd)


class FdFront:
    """The side channel ``<socket>.fd``: a caller connects, sends one byte
    (IMAGE_OUT or IMAGE_IN) with a descriptor attached, and reads back one
    line, ``token <hex>`` or ``error <message>``."""

    def __init__(self, path: Path, files: LocalFiles, gid: int | None) -> None:
        self.path = path
        self.files = files
        self.gid = gid
        self._sock: socket.socket | None = None
        self._closing = False

    def start(self) -> None:
        if self.path.is_socket():
            self.path.unlink()   # the main socket was found stale: so is this one
        self._sock = listen_unix(self.path, self.gid)
        # Accept wakes up this often to close expired tokens.
        self._sock.settimeout(SWEEP_SECONDS)
        threading.Thread(target=self._accept_loop, name="fd-front", daemon=True).start()

    def stop(self) -> None:
        self._closing = True
        _close_listener(self._sock, self.path)
        self.files.close()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                self.files.sweep()
                continue
            except OSError:
                if self._closing:
                    return
                log.exception("accept_failed")
                continue
            # A thread each: a caller that connects and sends nothing must
            # not hold up the others.
            threading.Thread(target=self._serve, args=(conn,), name="fd-hand-over",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        token = ""
        with conn:
            try:
                pid, uid, _ = peer_credentials(conn)
                if not caller_allowed(uid, pid, self.gid):
                    log.warning("caller_refused", uid=uid, pid=pid, channel="fd")
                    return   # closing drops the descriptor still queued, unreceived
                conn.settimeout(HAND_OVER_SECONDS)
                try:
                    mode, fd = receive_fd(conn)
                    token = self.files.add(fd, mode, uid, pid)
                    reply = f"token {token}\n"
                except CkptdError as e:
                    reply = f"error {e.message}\n"
                conn.sendall(reply.encode())
            except OSError:
                # Gone or too slow: what it sent is closed with conn, and a
                # token it cannot have read is of no use to anyone.
                if token:
                    self.files.discard(token)


def receive_fd(conn: socket.socket) -> tuple[str, int]:
    """One byte and the one descriptor attached to it, close-on-exec at once
    (the daemon starts processes from other threads all the time)."""
    data, ancillary, flags, _ = conn.recvmsg(
        1, socket.CMSG_SPACE(MAX_HANDED_FDS * 4), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
    if len(fds) == 1 and not flags & socket.MSG_CTRUNC:
        return data.decode(errors="replace"), fds[0]
    for fd in fds:
        os.close(fd)
    raise UsageError("send one byte with exactly one descriptor attached")
