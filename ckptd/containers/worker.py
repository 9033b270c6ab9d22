"""The daemon's handle on one engine worker process.

Every checkpoint or restore runs in a worker process of its own: ptrace
belongs to the thread that attached, and a crash in the engine must not take
the daemon down. Starting ``python -m ckptd.engine.worker`` afresh costs
~135 ms of CPU (interpreter and imports), more than a whole checkpoint of a
small process, so ``WorkerPool`` runs a fork server (ckptd/engine/forkserver.py,
driven through ckptd/containers/forks.py) that has the engine imported and
forks each worker in ~1.3 ms, and keeps one forked ahead. A forked worker is
the fork server's child: ``ForkedWorker`` watches and signals it through a
pidfd and has the server reap it. If the fork server is gone or misbehaves,
it is replaced and the worker is started afresh, the old way: an operation
never fails for want of a fork server.

The worker speaks newline-delimited JSON on a unix socket whose fd number it
finds in $CKPTD_CONTROL_FD (default 3) and moves image bytes on stdout
(checkpoint) or stdin (restore), or, when the request says
``"image_fd": true``, through a caller's file whose descriptor comes attached
to the request (SCM_RIGHTS on the control socket). Closing the handle kills a
worker that is still running and reaps it.
"""

from __future__ import annotations

import json
import os
import select
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

import structlog

from ckptd import errors, logs
from ckptd.containers.forks import ForkServer, ForkServerError, RequestRefused
from ckptd.containers.ahead import Put, read_ahead
from ckptd.containers.children import python_argv, python_env
from ckptd.containers.spares import Spares

log = structlog.get_logger(__name__)

WORKER_MODULE = "ckptd.engine.worker"
CONTROL_FD_ENV = "CKPTD_CONTROL_FD"
# Image bytes are read from the worker in pieces of this size: the gRPC chunk
# size, well under gRPC's 4 MiB message limit.
CHUNK = 1 << 20
MAX_CONTROL_LINE = 1 << 20    # a progress or error line is far smaller
# Chunks read from the worker ahead of the consumer. A Checkpoint stream sends
# one message at a time and waits for each; reading only when it asks made
# the engine (blocked on its full 1 MiB pipe) and the stream take turns
# instead of overlapping (1 GiB: 1.3 s, ~ the sum of the two).
READ_AHEAD = 8
READ_AHEAD_POLL = 0.1         # seconds; how soon an abandoned reader notices
WORKER_EXIT_WAIT = 10.0       # seconds for a worker to exit once it is done
# A forked worker whose fork server died is handed to us when the server's
# exit completes, just after its socket closed: how long to wait for that.
ORPHAN_WAIT = 2.0             # seconds
ORPHAN_POLL = 0.005
STATUS_LOST = 255             # the exit status of a worker nobody could reap for us

_KINDS: dict[str, type[errors.CkptdError]] = {
    "usage": errors.UsageError, "image": errors.UsageError,
    "unsupported": errors.UnsupportedError, "state": errors.StateError,
    "notfound": errors.NotFoundError, "permission": errors.PermissionError_,
    "system": errors.SystemError_,
}


def error_from(report: dict[str, Any]) -> errors.CkptdError:
    """The worker's ``{"error": ...}`` as one of our errors."""
    kind = str(report.get("kind", "system"))
    message = str(report.get("message", "the engine failed without saying why"))
    context = report.get("context") or {}
    if kind == "image":
        return errors.ImageError(message.removeprefix("bad image: "))
    return _KINDS.get(kind, errors.SystemError_)(message, **context)


class Worker:
    """One engine worker; use as a context manager. Started with both image
    pipes; ``use()`` keeps the one the operation needs."""

    def __init__(self, forks: ForkServer | None = None) -> None:
        """Forked by ``forks`` if given and working, else started afresh."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control = ours
        self._buffer = b""
        self.proc: subprocess.Popen[bytes] | ForkedWorker
        try:
            forked = None if forks is None else _forked(forks, theirs)
            self.proc = forked if forked is not None else _started(theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        log.debug("worker_started", worker_pid=self.proc.pid, forked=forked is not None)

    def use(self, *, image_in: bool, pipe: bool = True) -> Worker:
        """Close our end of the pipes this operation does not use: the image
        pipe of the other direction, and this one too if the image goes
        through a file (``pipe`` False)."""
        if image_in or not pipe:
            self._close_pipe("stdout")
        if not image_in or not pipe:
            self._close_pipe("stdin")
        return self

    def _close_pipe(self, name: str) -> None:
        stream = getattr(self.proc, name)
        assert stream is not None
        stream.close()
        setattr(self.proc, name, None)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, message: dict[str, Any], image_fd: int | None = None) -> None:
        """The operation's first message, with the log context of the call
        (a worker started ahead of time could not inherit it) and the image
        file, if it is a caller's, attached."""
        context = {k: v for k, v in structlog.contextvars.get_contextvars().items()
                   if isinstance(v, (str, int, float, bool))}
        self.send({**message, "log_context": context, "image_fd": image_fd is not None},
                  image_fd)

    def send(self, message: dict[str, Any], fd: int | None = None) -> None:
        data = (json.dumps(message) + "\n").encode()
        try:
            sent = 0 if fd is None else socket.send_fds(self.control, [data], [fd])
            if sent < len(data):   # not even b"": a worker done already would raise EPIPE
                self.control.sendall(data[sent:])
        except OSError as e:
            raise errors.SystemError_(f"the engine worker is gone ({e.strerror}); "
                                      f"{self._exit_text()}") from e

    def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The next control message; SystemError_ if the worker died first."""
        while b"\n" not in self._buffer:
            self.control.settimeout(timeout)
            try:
                data = self.control.recv(65536)
            except TimeoutError:
                raise errors.TimeoutError_("the engine worker did not answer in time") from None
            except ConnectionResetError:
                data = b""   # it died before reading all we sent: the same end
            if not data:
                raise errors.SystemError_(f"the engine worker ended unexpectedly; "
                                          f"{self._exit_text()}")
            self._buffer += data
            if len(self._buffer) > MAX_CONTROL_LINE:
                raise errors.BugError("the engine worker sent an oversized control line")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def pending(self) -> bool:
        return b"\n" in self._buffer

    def events(self) -> Iterator[tuple[str, Any]]:
        """For a checkpoint: ("data", bytes) and ("control", message) as they
        come, until stdout ends; control messages after that come from receive().
        A thread reads them up to READ_AHEAD items ahead of the consumer."""
        return read_ahead(self._read_events, depth=READ_AHEAD, poll=READ_AHEAD_POLL,
                          name="worker-read-ahead")

    def _read_events(self, put: Put) -> None:
        assert self.proc.stdout is not None
        out = self.proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(out, selectors.EVENT_READ, "data")
        sel.register(self.control, selectors.EVENT_READ, "control")
        try:
            while True:
                while self.pending():
                    if not put(("control", self.receive())):
                        return
                for key, _ in sel.select(READ_AHEAD_POLL):
                    item: tuple[str, Any]
                    if key.data == "data":
                        data = os.read(out, CHUNK)
                        if not data:
                            return    # stdout ended: the image is out
                        item = ("data", data)
                    else:
                        item = ("control", self.receive())
                    if not put(item):
                        return    # the consumer is gone: stop reading
        finally:
            sel.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass  # a broken pipe to a dead worker: nothing to flush
        self.proc.wait()
        if isinstance(self.proc, ForkedWorker):
            self.proc.release()
        self.control.close()

    def wait(self, timeout: float = WORKER_EXIT_WAIT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise errors.TimeoutError_("the engine worker did not exit after finishing") from None

    def _exit_text(self) -> str:
        try:
            code = self.proc.wait(2)
        except subprocess.TimeoutExpired:
            return "it is still running"
        return f"it exited with status {code}"



def _started(theirs: socket.socket) -> subprocess.Popen[bytes]:
    """A worker started afresh: ``python -m ckptd.engine.worker``."""
    try:
        return subprocess.Popen(
            python_argv(WORKER_MODULE),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=None,   # the worker's own log lines go where ours go
            # No preexec_fn to move it to fd 3: forking a threaded
            # daemon must not run Python in the child. Its number is passed.
            pass_fds=(theirs.fileno(),), close_fds=True,
            env=python_env({**os.environ, **logs.child_env(),
                            CONTROL_FD_ENV: str(theirs.fileno())}),
            start_new_session=True,   # a Ctrl-C to a foreground daemon is not for it
        )
    except OSError as e:
        raise errors.SystemError_(f"cannot start the engine worker: {e}") from e


def _forked(forks: ForkServer, theirs: socket.socket) -> ForkedWorker | None:
    """A worker forked by the fork server; None if it cannot make one now
    (it said why in the log), for the caller to start one afresh."""
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    ours = [in_w, out_r]
    try:
        env = {**os.environ, **logs.child_env()}
        pid = forks.fork([theirs.fileno(), in_r, out_w, 2], env)   # 2: our stderr, as Popen gives
        # The server reaps it only when asked, after this: the pid stays ours.
        pidfd = os.pidfd_open(pid)
    except (ForkServerError, RequestRefused, OSError) as e:
        log.warning("worker_fork_failed", error=str(e), fallback="fresh worker")
        for fd in ours:
            os.close(fd)
        return None
    finally:
        os.close(in_r)
        os.close(out_w)
    return ForkedWorker(pid, pidfd, forks, os.fdopen(in_w, "wb"), os.fdopen(out_r, "rb"))


class ForkedWorker:
    """What ``Worker`` uses of a ``subprocess.Popen``, for a worker that is
    the fork server's child, not ours: it is watched through a pidfd,
    signalled through it (no pid reuse can misdirect a kill) and reaped by
    the fork server on our request once the pidfd says it has exited."""

    def __init__(self, pid: int, pidfd: int, forks: ForkServer,
                 stdin: BinaryIO, stdout: BinaryIO) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.stdin: BinaryIO | None = stdin
        self.stdout: BinaryIO | None = stdout
        self.returncode: int | None = None
        self._forks = forks
        self._lock = threading.Lock()   # one reaper: wait() and poll() come from several threads

    def poll(self) -> int | None:
        if self.returncode is None and self._exited(0):
            self._reap()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not self._exited(timeout):
                raise subprocess.TimeoutExpired([WORKER_MODULE], timeout or 0)
            self._reap()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass   # exited already; wait() collects it

    def release(self) -> None:
        """Close the pidfd, once the worker is reaped."""
        with self._lock:
            if self.pidfd >= 0:
                os.close(self.pidfd)
                self.pidfd = -1

    def _exited(self, timeout: float | None) -> bool:
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))

    def _reap(self) -> None:
        with self._lock:
            if self.returncode is not None:
                return
            try:
                self.returncode = self._forks.reap(self.pid)
                return
            except (ForkServerError, RequestRefused) as e:
                why = str(e)
            # The server died: its zombies are handed to us (the daemon is
            # a child subreaper), a moment after its socket closed.
            deadline = time.monotonic() + ORPHAN_WAIT
            while True:
                try:
                    result = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
                except ChildProcessError:
                    if time.monotonic() < deadline:
                        time.sleep(ORPHAN_POLL)
                        continue
                    log.error("worker_status_lost", worker_pid=self.pid, error=why)
                    self.returncode = STATUS_LOST
                    return
                if result is not None:
                    self.returncode = (result.si_status if result.si_code == os.CLD_EXITED
                                       else -result.si_status)
                    return
                time.sleep(ORPHAN_POLL)   # ours, exiting: not a zombie quite yet


# One, forked ahead: a fork costs ~1.3 ms and the worker answers ~2 ms later,
# so a spare saves only that; a second one made no difference in the sleep
# benchmark (back-to-back checkpoint/restart rounds, medians within 1-3 ms
# for 0, 1 and 2 spares) and would only hold memory.
SPARE_WORKERS = 1


class WorkerPool:
    """Hands out engine workers, keeping some started ahead of need."""

    def __init__(self, count: int = SPARE_WORKERS) -> None:
        self.forks = ForkServer()
        self._spares: Spares[Worker] = Spares("worker", count, lambda: Worker(self.forks),
                                              Worker.alive, Worker.close,
                                              pid=lambda w: w.proc.pid)

    def take(self, *, image_in: bool, pipe: bool = True) -> Worker:
        return self._spares.take().use(image_in=image_in, pipe=pipe)

    def close(self) -> None:
        self._spares.close()
        self.forks.close()
