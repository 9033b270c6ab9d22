"""Moving image bytes between gRPC streams and files.

A checkpoint image goes to a temporary file next to its destination and is
renamed into place only once the daemon has sent all of it, so a failed or
interrupted checkpoint never leaves a truncated image that looks like a good
one.

On the daemon's unix socket, a regular file need not cross gRPC at all: the
client opens it (with its own permissions), hands the open descriptor to the
daemon's side channel ``<socket>.fd`` and names the token it gets back in
the call; the engine then writes or reads the file itself (``hand_over``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO, BinaryIO, Union

from ckptd.image import decode_bytes_field, encode_bytes_field
from ckptd.v1 import api_pb2

# The size of the data chunks sent to Restart: the API asks for at most 1 MiB,
# large enough that per-message overhead is negligible at disk speed.
CHUNK_BYTES = 1024 * 1024

# The daemon's side channel for open files, and the byte saying what the
# file is for (see ckptd/server/auth.py).
FD_SOCKET_SUFFIX = ".fd"
IMAGE_OUT, IMAGE_IN = b"w", b"r"
# "0" makes every Client stream its images, as it must over TCP: for tests
# and for comparing the two paths.
LOCAL_FILES_ENV = "CKPTD_LOCAL_FILES"
HAND_OVER_TIMEOUT = 10.0   # seconds; the daemon answers at once
MAX_REPLY = 256            # "token " and 32 hex digits, or a short error

# Progress callbacks receive the number of image bytes moved so far.
ProgressFn = Callable[[int], None]
PathOrFile = Union[str, "os.PathLike[str]", BinaryIO]


# Field numbers of the image bytes in ImageChunk and RestartRequest.
_CHUNK_DATA = api_pb2.ImageChunk.DESCRIPTOR.fields_by_name["data"].number
_RESTART_DATA = api_pb2.RestartRequest.DESCRIPTOR.fields_by_name["data"].number


def image_chunk_data(raw: bytes) -> bytes | memoryview | api_pb2.ImageComplete:
    """gRPC deserializer of ImageChunk straight to its data, a view of ``raw``
    (a protobuf object would copy every chunk twice: parse, then ``.data``);
    the ImageComplete of the last one."""
    data = decode_bytes_field(raw, _CHUNK_DATA)
    if data is not None:
        return data
    chunk = api_pb2.ImageChunk.FromString(raw)
    return chunk.complete if chunk.HasField("complete") else chunk.data


def restart_request_bytes(request: api_pb2.RestartRequest | bytes) -> bytes:
    """gRPC serializer of RestartRequest that passes ``restart_data`` through."""
    return request if isinstance(request, bytes) else request.SerializeToString()


def restart_data(chunk: bytes | memoryview) -> bytes:
    """A serialized RestartRequest carrying ``chunk``, built with one copy."""
    return encode_bytes_field(_RESTART_DATA, chunk)


def rechunk(chunks: Iterable[bytes], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Yield the bytes of ``chunks`` in pieces of at most ``size``, skipping empty ones."""
    for chunk in chunks:
        if len(chunk) <= size:
            if chunk:
                yield bytes(chunk)
            continue
        view = memoryview(chunk)
        for start in range(0, len(view), size):
            yield bytes(view[start:start + size])


def read_chunks(f: IO[bytes], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Read ``f`` to its end in chunks of at most ``size``."""
    while True:
        chunk = f.read(size)
        if not chunk:
            return
        yield chunk


def counted(chunks: Iterable[bytes], progress: ProgressFn | None) -> Iterator[bytes]:
    """Pass ``chunks`` through, reporting the running byte count to ``progress``."""
    done = 0
    for chunk in chunks:
        yield chunk
        done += len(chunk)
        if progress is not None:
            progress(done)


def write_chunks(chunks: Iterable[bytes], f: BinaryIO) -> int:
    """Write every chunk to ``f``; returns the number of bytes written."""
    total = 0
    for chunk in chunks:
        f.write(chunk)
        total += len(chunk)
    f.flush()
    return total


class AtomicFile:
    """An open file that appears at its path only once ``commit`` is called
    (flushed, fsynced, renamed into place, the directory fsynced)."""

    def __init__(self, f: BinaryIO, tmp: str, target: str) -> None:
        self.file = f
        self._tmp = tmp
        self._target = target
        self.committed = False

    def commit(self) -> None:
        if self.committed:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        os.replace(self._tmp, self._target)
        _sync_directory(os.path.dirname(self._target) or ".")
        self.committed = True


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[AtomicFile]:
    """A file that appears at ``path`` only if committed, or if the block
    finishes without error (which commits it).

    The temporary file is created with mode 0600 and keeps it: an image holds
    the whole memory of the checkpointed processes, secrets included.
    """
    target = os.fspath(path)
    if os.path.isdir(target):
        # Found now, not at the rename after a whole (maybe fatal) checkpoint.
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), target)
    directory = os.path.dirname(target) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".partial",
                               dir=directory)
    out: AtomicFile | None = None
    try:
        with os.fdopen(fd, "wb") as f:
            out = AtomicFile(f, tmp, target)
            yield out
            out.commit()
    except BaseException:
        # Any failure, Ctrl-C included, must not leave a partial image behind
        # (a committed one is whole: the processes may be gone with it).
        if out is None or not out.committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def make_durable(f: BinaryIO) -> None:
    """Flush ``f``, and fsync it if it is a regular file (not a pipe or tty)."""
    f.flush()
    fd = regular_fd(f)
    if fd is not None:
        os.fsync(fd)


def _sync_directory(directory: str) -> None:
    """Make the rename durable, so a crash right after cannot lose the image."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # best effort: the image itself is already fsynced
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the data is safe
    finally:
        os.close(fd)


def is_path(target: PathOrFile) -> bool:
    return isinstance(target, (str, os.PathLike))


def regular_fd(f: object) -> int | None:
    """The descriptor of ``f`` if it is a regular file: only those are handed
    to the daemon (pipes and terminals stream)."""
    try:
        fd = f.fileno()  # type: ignore[attr-defined]
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (AttributeError, OSError, ValueError):
        return None


def hand_over(socket_path: str, fd: int, mode: bytes) -> str | None:
    """Give the daemon at ``socket_path`` the open file ``fd``; the token that
    names it in one call, or None if the daemon takes no files (no side
    channel, an older daemon: then the image streams). A refusal raises
    ``ValueError`` with the daemon's reason."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(HAND_OVER_TIMEOUT)
        try:
            sock.connect(socket_path + FD_SOCKET_SUFFIX)
            socket.send_fds(sock, [mode], [fd])
            reply = b""
            while not reply.endswith(b"\n") and len(reply) < MAX_REPLY:
                data = sock.recv(MAX_REPLY)
                if not data:
                    return None   # refused without a word: the call will say why
                reply += data
        except OSError:
            return None
    kind, _, rest = reply.decode(errors="replace").strip().partition(" ")
    if kind == "token" and rest:
        return rest
    raise ValueError(rest or reply.decode(errors="replace"))


def file_offset(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_CUR)
