"""The daemon's handle on one engine worker process.

Every checkpoint or restore runs in its own ``python -m ckptd.engine.worker``:
ptrace belongs to the thread that attached, and a crash in the engine must
not take the daemon down. Starting Python and importing the engine costs
~200 ms, more than a whole checkpoint of a small process, so ``WorkerPool``
keeps workers started ahead, waiting for their request. The worker speaks newline-delimited JSON on a unix
socket whose fd number it finds in $CKPTD_CONTROL_FD (default 3) and moves image bytes on stdout (checkpoint) or stdin (restore),
or, when the request says ``"image_fd": true``, through a caller's file whose
descriptor comes attached to the request (SCM_RIGHTS on the control socket).
Closing the handle kills a worker that is still running and reaps it.
"""

from __future__ import annotations

import json
import os
import queue
import selectors
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import structlog

from ckptd import errors, logs
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

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control = ours
        self._buffer = b""
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=None,   # the worker's own log lines go where ours go
                # No preexec_fn to move it to fd 3: forking a threaded
                # daemon must not run Python in the child. Its number is passed.
                pass_fds=(theirs.fileno(),), close_fds=True,
                env={**os.environ, **logs.child_env(), CONTROL_FD_ENV: str(theirs.fileno())},
                start_new_session=True,   # a Ctrl-C to a foreground daemon is not for it
            )
        except OSError as e:
            ours.close()
            raise errors.SystemError_(f"cannot start the engine worker: {e}") from e
        finally:
            theirs.close()
        log.debug("worker_started", worker_pid=self.proc.pid)

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
        ahead: queue.Queue[tuple[str, Any]] = queue.Queue(READ_AHEAD)
        stop = threading.Event()
        reader = threading.Thread(target=self._read_events, args=(ahead, stop),
                                  name="worker-read-ahead", daemon=True)
        reader.start()
        try:
            while True:
                kind, item = ahead.get()
                if kind == "end":
                    return
                if kind == "failed":
                    raise item
                yield kind, item
        finally:
            stop.set()
            reader.join()

    def _read_events(self, ahead: queue.Queue[tuple[str, Any]], stop: threading.Event) -> None:
        def put(item: tuple[str, Any]) -> bool:
            while not stop.is_set():
                try:
                    ahead.put(item, timeout=READ_AHEAD_POLL)
                    return True
                except queue.Full:
                    continue
            return False   # the consumer is gone: stop reading

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
                            put(("end", None))
                            return
                        item = ("data", data)
                    else:
                        item = ("control", self.receive())
                    if not put(item):
                        return
                if stop.is_set():
                    return
        except Exception as e:  # noqa: BLE001 - raised again by events() in its caller
            put(("failed", e))
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



# Two: a checkpoint followed at once by a restart (a benchmark, a migration)
# must not wait for a cold start.
SPARE_WORKERS = 2


class WorkerPool:
    """Hands out engine workers, keeping some started ahead of need."""

    def __init__(self, count: int = SPARE_WORKERS) -> None:
        self._spares: Spares[Worker] = Spares("worker", count, Worker, Worker.alive,
                                              Worker.close, pid=lambda w: w.proc.pid)

    def take(self, *, image_in: bool, pipe: bool = True) -> Worker:
        return self._spares.take().use(image_in=image_in, pipe=pipe)

    def close(self) -> None:
        self._spares.close()
