"""The daemon's handle on its fork server (ckptd/engine/forkserver.py).

``ForkServer.fork`` asks the server for a new engine worker and returns its
pid; ``reap`` asks for the exit status of one that has exited. One
conversation at a time: the pool is used from several threads. When the
server dies or misbehaves (no answer in time, a broken socket, nonsense), it
is killed, reaped and replaced by a new one at once, and the call raises
``ForkServerError``: the caller then starts its worker the old way. The
server's answer "no" to a request (``RequestRefused``) is not misbehaviour.
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import threading
from typing import Any, NoReturn

import structlog

from ckptd import logs
from ckptd.containers.children import python_argv, python_env
from ckptd.engine import forkserver as protocol

log = structlog.get_logger(__name__)

SERVER_MODULE = "ckptd.engine.forkserver"
# A fork takes a few ms; a server just started needs its imports first
# (~0.15 s, several times that on a busy machine) before it answers.
REPLY_TIMEOUT = 5.0           # seconds
CLOSE_WAIT = 10.0             # seconds for the server to exit once told to
MAX_REPLY = 1 << 16


class ForkServerError(Exception):
    """The fork server is gone or misbehaved (it has been replaced)."""


class RequestRefused(Exception):
    """The fork server answered with an error."""


class ForkServer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._closed = False
        with self._lock:
            self._start()

    @property
    def pid(self) -> int | None:
        with self._lock:
            return None if self._proc is None else self._proc.pid

    def fork(self, fds: list[int], env: dict[str, str]) -> int:
        """A new worker with ``fds`` (control, stdin, stdout, stderr) as its
        3, 0, 1, 2 and environment ``env``; its pid."""
        affinity = sorted(os.sched_getaffinity(os.getpid()))
        request = {"op": "fork", "env": env, "cwd": os.getcwd(), "affinity": affinity,
                   "umask": _umask()}
        answer = self._converse(request, fds)
        pid = answer.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            self._broken(f"bad fork answer {answer!r}")
        return pid

    def reap(self, pid: int) -> int:
        """The exit status of worker ``pid``, which has exited."""
        answer = self._converse({"op": "reap", "pid": pid}, [])
        code = answer.get("returncode")
        if answer.get("pid") != pid or not isinstance(code, int):
            self._broken(f"bad reap answer {answer!r}")
        return code

    def close(self) -> None:
        """Stop the server after the workers it made (they are the caller's
        to end first); reap it."""
        with self._lock:
            self._closed = True
            self._stop(kill=False)

    def _converse(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        with self._lock:
            if self._closed:
                raise ForkServerError("the fork server is closed")
            if self._proc is None:
                self._start()
            sock = self._sock
            assert sock is not None
            try:
                sock.settimeout(REPLY_TIMEOUT)
                socket.send_fds(sock, [json.dumps(request).encode()], fds)
                answer = self._answer(sock)
                if "ready" in answer:   # the first word of a new server
                    answer = self._answer(sock)
            except (OSError, ValueError) as e:
                self._replace(f"{type(e).__name__}: {e}")
                raise ForkServerError(f"the fork server failed: {e}") from e
        if "error" in answer:
            raise RequestRefused(str(answer["error"]))
        return answer

    def _answer(self, sock: socket.socket) -> dict[str, Any]:
        data, ancdata, flags, _ = sock.recvmsg(MAX_REPLY, socket.CMSG_SPACE(4))
        if ancdata:
            _close_received(ancdata)
            raise ValueError("the fork server sent file descriptors")
        if not data:
            raise ValueError("the fork server closed its socket")
        answer = json.loads(data)
        if not isinstance(answer, dict):
            raise ValueError(f"answer {answer!r} is not an object")
        return answer

    def _broken(self, why: str) -> NoReturn:
        with self._lock:
            self._replace(why)
        raise ForkServerError(why)

    def _replace(self, why: str) -> None:
        log.warning("fork_server_replaced", server_pid=self._proc and self._proc.pid, why=why)
        self._stop(kill=True)
        if not self._closed:
            try:
                self._start()
            except OSError as e:
                # Tried again at the next fork; until then workers start cold.
                log.error("fork_server_start_failed", error=str(e))

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                python_argv(SERVER_MODULE),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=None,   # its own complaints go where our log goes
                pass_fds=(theirs.fileno(),), close_fds=True,
                env=python_env({**os.environ, **logs.child_env(),
                                protocol.FD_ENV: str(theirs.fileno())}),
                start_new_session=True)   # a Ctrl-C to a foreground daemon is not for it
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        log.debug("fork_server_started", server_pid=self._proc.pid)

    def _stop(self, *, kill: bool) -> None:
        proc, sock = self._proc, self._sock
        self._proc = self._sock = None
        if sock is not None:
            sock.close()   # end of file: it waits for its workers, then exits
        if proc is None:
            return
        if kill:
            proc.kill()
        try:
            proc.wait(CLOSE_WAIT)
        except subprocess.TimeoutExpired:
            log.error("fork_server_did_not_exit", server_pid=proc.pid)
            proc.kill()
            proc.wait()


def _close_received(ancdata: list[tuple[int, int, bytes]]) -> None:
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                os.close(fd)


def _umask() -> int:
    """Ours, read without setting it (os.umask would race other threads)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022   # no Umask line (kernels before 4.7): the usual default
