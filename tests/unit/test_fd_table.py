"""The daemon's table of files handed over by local callers (LocalFiles) and
the receiving end of its side channel: tokens are single-use, expire, belong
to one uid and pid, and every descriptor is closed on every path."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ckptd.errors import PermissionError_, UsageError
from ckptd.server.auth import IMAGE_IN, IMAGE_OUT, LocalFiles, Peer, receive_fd

CALLER = Peer("unix", uid=1000, gid=1000, pid=4242)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def files(clock: Clock):
    table = LocalFiles(ttl=60.0, clock=clock)
    yield table
    table.close()


def open_file(tmp_path: Path, flags: int = os.O_RDWR) -> int:
    path = tmp_path / "image"
    path.touch()
    return os.open(path, flags | os.O_CLOEXEC)


def test_token_is_single_use(files: LocalFiles, tmp_path: Path) -> None:
    fd = open_file(tmp_path)
    token = files.add(fd, IMAGE_OUT, CALLER.uid, CALLER.pid)
    assert len(token) == 32 and len(files) == 1
    got = files.take(token, IMAGE_OUT, CALLER)
    assert got == fd and is_open(fd), "the caller of take() owns the descriptor now"
    os.close(fd)
    with pytest.raises(UsageError, match="unknown local file token"):
        files.take(token, IMAGE_OUT, CALLER)
    with pytest.raises(UsageError, match="unknown"):
        files.take("f" * 32, IMAGE_OUT, CALLER)


def test_tokens_are_distinct(files: LocalFiles, tmp_path: Path) -> None:
    tokens = {files.add(open_file(tmp_path), IMAGE_OUT, 0, 1) for _ in range(5)}
    assert len(tokens) == 5 and len(files) == 5


def test_expired_token_is_refused_and_closed(files: LocalFiles, clock: Clock,
                                             tmp_path: Path) -> None:
    fd = open_file(tmp_path)
    token = files.add(fd, IMAGE_IN, CALLER.uid, CALLER.pid)
    clock.now += 61
    with pytest.raises(UsageError):
        files.take(token, IMAGE_IN, CALLER)
    assert not is_open(fd)


def test_sweep_closes_unused_tokens(files: LocalFiles, clock: Clock, tmp_path: Path) -> None:
    old = open_file(tmp_path)
    files.add(old, IMAGE_OUT, 0, 1)
    clock.now += 30
    young = open_file(tmp_path)
    files.add(young, IMAGE_OUT, 0, 1)
    clock.now += 31
    files.sweep()
    assert not is_open(old) and is_open(young) and len(files) == 1
    files.close()
    assert not is_open(young) and len(files) == 0


@pytest.mark.parametrize("who", [Peer("unix", uid=1001, gid=1000, pid=4242),
                                 Peer("unix", uid=1000, gid=1000, pid=4243)])
def test_another_callers_token_is_refused_and_burnt(files: LocalFiles, tmp_path: Path,
                                                    who: Peer) -> None:
    fd = open_file(tmp_path)
    token = files.add(fd, IMAGE_OUT, CALLER.uid, CALLER.pid)
    with pytest.raises(PermissionError_, match="another process"):
        files.take(token, IMAGE_OUT, who)
    assert not is_open(fd)
    with pytest.raises(UsageError):
        files.take(token, IMAGE_OUT, CALLER)   # a token shown to anyone is spent


def test_tokens_only_on_the_unix_socket(files: LocalFiles, tmp_path: Path) -> None:
    token = files.add(open_file(tmp_path), IMAGE_OUT, 0, 0)
    with pytest.raises(PermissionError_, match="unix socket"):
        files.take(token, IMAGE_OUT, Peer("tls", 0, 0, name="operator"))
    assert len(files) == 1, "a TCP caller cannot even spend it"


def test_direction_must_match(files: LocalFiles, tmp_path: Path) -> None:
    fd = open_file(tmp_path)
    token = files.add(fd, IMAGE_IN, CALLER.uid, CALLER.pid)
    with pytest.raises(UsageError, match="for reading"):
        files.take(token, IMAGE_OUT, CALLER)
    assert not is_open(fd)


def test_non_regular_descriptors_are_refused_and_closed(files: LocalFiles,
                                                        tmp_path: Path) -> None:
    r, w = os.pipe()
    with pytest.raises(UsageError, match="regular file"):
        files.add(w, IMAGE_OUT, 0, 1)
    assert not is_open(w)
    os.close(r)
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(UsageError, match="regular file"):
        files.add(d, IMAGE_IN, 0, 1)
    assert not is_open(d) and len(files) == 0


@pytest.mark.parametrize("flags,mode", [(os.O_RDONLY, IMAGE_OUT), (os.O_WRONLY, IMAGE_IN),
                                        (os.O_PATH, IMAGE_IN), (os.O_RDWR, "x")])
def test_access_mode_must_allow_the_transfer(files: LocalFiles, tmp_path: Path,
                                             flags: int, mode: str) -> None:
    fd = open_file(tmp_path, flags)
    with pytest.raises(UsageError):
        files.add(fd, mode, 0, 1)
    assert not is_open(fd)


def test_receive_fd_takes_exactly_one(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with a, b:
        fd = open_file(tmp_path)
        socket.send_fds(a, [b"w"], [fd])
        os.close(fd)
        mode, got = receive_fd(b)
        assert mode == "w" and is_open(got)
        assert not os.get_inheritable(got), "close-on-exec at once"
        os.close(got)

        fds = [open_file(tmp_path) for _ in range(2)]
        socket.send_fds(a, [b"r"], fds)
        for fd in fds:
            os.close(fd)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(UsageError, match="exactly one"):
            receive_fd(b)
        assert len(os.listdir("/proc/self/fd")) == before, "both received, both closed"

        a.send(b"r")   # no descriptor at all
        with pytest.raises(UsageError):
            receive_fd(b)


@pytest.mark.parametrize("bits", [0o4755, 0o2755])
def test_set_id_files_are_not_written(files: LocalFiles, tmp_path: Path, bits: int) -> None:
    fd = open_file(tmp_path, os.O_WRONLY)
    os.fchmod(fd, bits)
    with pytest.raises(UsageError, match="set-id"):
        files.add(fd, IMAGE_OUT, 0, 1)
    assert not is_open(fd)
    fd = open_file(tmp_path, os.O_RDONLY)
    files.add(fd, IMAGE_IN, 0, 1)   # reading one is harmless
