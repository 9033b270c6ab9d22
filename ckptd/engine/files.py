"""Open files: regular files and directories at the same fd numbers with
their flags and offsets, a few character devices by path, deleted-but-open
files (contents in a FILE_DATA record), cwd and root. An open file
description that several processes of the tree hold (fork after open) is
opened once, by its owner, and taken by the others (shared.py). File locks
held through the fds come back too (locks.py).

Anything else (sockets, pipes, ttys, eventfd, epoll ...) is refused up front
with an UnsupportedError naming pid, fd and kind.
"""

from __future__ import annotations

import os
import stat as stat_mod
import uuid

from ckptd.errors import ImageError, StateError, UnsupportedError
from ckptd.engine import locks, shared
from ckptd.engine.memory import file_stat
from ckptd.kernel import proctask, sysnr
from ckptd.kernel import task as task_mod
from ckptd.v1 import image_pb2

DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
# A deleted file's contents travel in one metadata record: bounded by it.
MAX_DELETED_FILE = 32 << 20
MAX_FD = 1 << 20             # the kernel's fs.nr_open default ceiling
O_CLOEXEC = 0o2000000
# Flags that must not be replayed on open: they would create or truncate.
# O_TMPFILE (__O_TMPFILE | O_DIRECTORY) made an unnamed file: it is
# reopened by the name we give it, as a plain file.
O_TMPFILE_BIT = 0o20000000
_DROP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | O_TMPFILE_BIT


def _kind_of(link: str, st: os.stat_result) -> str:
    for prefix in ("socket:", "pipe:", "anon_inode:"):
        if link.startswith(prefix):
            return link.split("[")[-1].rstrip("]") if prefix == "anon_inode:" else prefix[:-1]
    if stat_mod.S_ISCHR(st.st_mode):
        return "tty" if link.startswith("/dev/pts") or "tty" in link else "character device"
    if stat_mod.S_ISFIFO(st.st_mode):
        return "fifo"
    return "special file"


def dump_files(pid: int) -> tuple[image_pb2.Files, list[image_pb2.FileData]]:
    files = image_pb2.Files()
    data: list[image_pb2.FileData] = []
    firsts: dict[tuple[int, int], list[int]] = {}   # (dev, ino) -> first fds of descriptions
    for fd in proctask.list_fds(pid):
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
        st = os.stat(f"/proc/{pid}/fd/{fd}")
        info = proctask.read_fdinfo(pid, fd)
        msg = image_pb2.Fd(fd=fd, flags=info.flags, pos=info.pos, stat=file_stat(st))
        candidates = firsts.setdefault((st.st_dev, st.st_ino), [])
        shared = next((c for c in candidates if task_mod.same_file(pid, c, fd)), None)
        if shared is not None:
            msg.is_dup, msg.dup_of = True, shared
            msg.kind, msg.path = files.fds[[f.fd for f in files.fds].index(shared)].kind, "/"
            files.fds.append(msg)
            continue
        candidates.append(fd)
        # A dup shows the same locks: they are the first fd's to take back.
        msg.locks.extend(locks.parse(info.locks, pid, fd))
        if stat_mod.S_ISREG(st.st_mode):
            msg.kind = "file"
            msg.deleted = st.st_nlink == 0
            msg.path = link.removesuffix(" (deleted)") if msg.deleted else link
            if msg.deleted:
                data.append(_deleted_contents(pid, fd, st))
        elif stat_mod.S_ISDIR(st.st_mode):
            msg.kind, msg.path = "dir", link
        elif stat_mod.S_ISCHR(st.st_mode) and link in DEVICES:
            msg.kind, msg.path = "dev", link
        else:
            kind = _kind_of(link, st)
            raise UnsupportedError(f"pid {pid} has fd {fd} open on a {kind} ({link}), which "
                                   "cannot be checkpointed yet", pid=pid, fd=fd, kind=kind)
        files.fds.append(msg)
    files.cwd = os.readlink(f"/proc/{pid}/cwd")
    files.root = os.readlink(f"/proc/{pid}/root")
    for what, path in (("working directory", files.cwd), ("root", files.root)):
        if path.endswith(" (deleted)"):
            raise UnsupportedError(f"pid {pid} has a deleted {what} {path}", pid=pid,
                                   kind=f"deleted {what}")
    return files, data


def _deleted_contents(pid: int, fd: int, st: os.stat_result) -> image_pb2.FileData:
    if st.st_size > MAX_DELETED_FILE:
        raise UnsupportedError(f"pid {pid} fd {fd} is a deleted file of {st.st_size} bytes "
                               f"(at most {MAX_DELETED_FILE} supported)", pid=pid, fd=fd,
                               kind="large deleted file")
    with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
        return image_pb2.FileData(fd=fd, data=f.read())


def check_files(files: image_pb2.Files, data: dict[int, bytes]) -> None:
    seen = set()
    for f in files.fds:
        if not 0 <= f.fd < MAX_FD or f.fd in seen:
            raise ImageError(f"bad or repeated fd number {f.fd}", record="FILES")
        if f.kind not in ("file", "dir", "dev") or not f.path.startswith("/"):
            raise ImageError(f"fd {f.fd} of unknown kind {f.kind!r} or path", record="FILES")
        locks.check(f)
        if f.is_dup and (f.dup_of not in seen or f.dup_of >= f.fd):
            raise ImageError(f"fd {f.fd} duplicates fd {f.dup_of}, not an earlier fd",
                             record="FILES")
        if f.shared_owner and not f.shared_id or f.shared_id and f.is_dup:
            raise ImageError(f"fd {f.fd} owns a shared file description without an id, "
                             "or is both a dup and shared", record="FILES")
        if f.deleted and f.fd not in data and not _taken(f):
            raise ImageError(f"deleted file at fd {f.fd} without its contents", record="FILES")
        seen.add(f.fd)
    ids = [f.shared_id for f in files.fds if f.shared_id]
    if len(ids) != len(set(ids)):
        raise ImageError(f"a shared file description twice in one fd table ({sorted(ids)}): "
                         "the second should be a dup", record="FILES")
    for path in (files.cwd, files.root):
        if not path.startswith("/"):
            raise ImageError(f"bad directory {path!r}", record="FILES")


def _taken(f: image_pb2.Fd) -> bool:
    """Whether the fd takes a description another task opens (shared.py)."""
    return bool(f.shared_id) and not f.shared_owner


def prepare_deleted(files: image_pb2.Files, data: dict[int, bytes]) -> dict[int, str]:
    """Recreate each deleted file as a temporary file in its old directory
    (same file system); fd -> path. The caller unlinks them once opened."""
    made: dict[int, str] = {}
    try:
        for f in files.fds:
            if not f.deleted or _taken(f):
                continue
            # Its old name if free, so that /proc/PID/fd shows the same link;
            # else a fresh name in the same directory (same file system).
            directory = os.path.dirname(f.path)
            tmp = f.path
            try:
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 f.stat.mode & 0o7777)
                except FileExistsError:
                    tmp = os.path.join(directory, f".ckptd-restore-{uuid.uuid4().hex}")
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 f.stat.mode & 0o7777)
            except OSError as e:
                raise StateError(f"cannot recreate deleted file {f.path}: {e.strerror}",
                                 fd=f.fd) from e
            made[f.fd] = tmp
            with os.fdopen(fd, "wb") as out:
                out.write(data[f.fd])
    except BaseException:
        unlink_all(made)
        raise
    return made


def unlink_all(made: dict[int, str]) -> None:
    for path in made.values():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass   # already gone: the goal


def check_paths(files: image_pb2.Files) -> None:
    for f in files.fds:
        if not f.deleted and not f.is_dup and not os.path.exists(f.path):
            raise StateError(f"fd {f.fd}: {f.path} no longer exists", fd=f.fd, path=f.path)


class FdTable:
    """The task's fd table as we change it: the kernel gives the lowest free
    number, so every fd an injected open returns is known in advance."""

    def __init__(self) -> None:
        self.used: set[int] = set()

    def lowest_free(self) -> int:
        n = 0
        while n in self.used:
            n += 1
        return n

    def open(self, batch, path_addr: int, flags: int, what: str) -> int:
        fd = self.lowest_free()
        batch.call(sysnr.OPEN, path_addr, flags, 0, what=what)
        self.used.add(fd)
        return fd

    def close(self, batch, fd: int) -> None:
        batch.call(sysnr.CLOSE, fd, what=f"close({fd})")
        self.used.discard(fd)


def restore_files(batch, files: image_pb2.Files, table: FdTable, temp: dict[int, str],
                  sharing=None) -> None:
    """Open each file at its fd number (ascending, so the lowest-free open is
    never above the wanted number). A description another task of the tree
    opens is taken from it (``sharing``: a shared.Sharing)."""
    for f in sorted(files.fds, key=lambda f: f.fd):
        flags = f.flags & ~_DROP_FLAGS
        if _taken(f) and sharing is not None:
            shared.take_fd(batch, table, f, sharing.take_from(f.shared_id))
            continue
        if f.is_dup:
            batch.call(sysnr.DUP3, f.dup_of, f.fd, flags & O_CLOEXEC, what=f"dup fd {f.fd}")
            table.used.add(f.fd)
            continue
        if f.kind != "dir":
            flags &= ~os.O_DIRECTORY
        path = temp.get(f.fd, f.path)
        got = table.open(batch, batch.cstr(path), flags, f"open {path} for fd {f.fd}")
        if got != f.fd:
            batch.call(sysnr.DUP3, got, f.fd, flags & O_CLOEXEC, what=f"dup to fd {f.fd}")
            table.used.add(f.fd)
            table.close(batch, got)
        if f.kind == "file" and f.pos:
            batch.call(sysnr.LSEEK, f.fd, f.pos, os.SEEK_SET, what=f"lseek fd {f.fd}")
        locks.restore(batch, f)


def restore_fs(batch, files: image_pb2.Files) -> None:
    batch.call(sysnr.CHDIR, batch.cstr(files.cwd), what=f"chdir {files.cwd}")
    if files.root != "/":
        batch.call(sysnr.CHROOT, batch.cstr(files.root), what=f"chroot {files.root}")
