"""``python -m ckptd.engine.worker``: one engine operation in its own process.

The daemon talks to it over a unix socket (fd $CKPTD_CONTROL_FD, default 3)
with newline-delimited JSON; image bytes go out on stdout (checkpoint) or
come in on stdin (restore), unless the request has ``"image_fd": true``: then
the image goes to or comes from the caller's own file, whose descriptor is
attached to the request message. The protocol is described in
``ckptd/containers/worker.py`` (the daemon's side) and below, step by step.
Every failure is one ``{"error": {kind, message, context}}`` line and exit 1,
after resuming (checkpoint) or killing what was built (restore).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any, BinaryIO, cast

import structlog

from ckptd import errors, logs
from ckptd.engine import api
from ckptd.engine.inject import InjectError

log = structlog.get_logger(__name__)

CONTROL_FD_ENV = "CKPTD_CONTROL_FD"
DEFAULT_CONTROL_FD = 3
# stdout is a pipe to the daemon: writes of this size keep syscalls few
# without holding much of the image in the worker.
OUT_BUFFER = 1 << 20
# A 64 KiB default pipe means a context switch per 64 KiB of image; 1 MiB
# (the default pipe-max-size for unprivileged callers, and the daemon's read
# size) lets each side move a whole chunk per wake-up.
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
MAX_FDS = 1   # the daemon attaches at most the image file to a message


def _grow_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass   # not a pipe (a file in tests), or over the limit: only slower


class Control:
    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.buffer = b""
        self.fds: list[int] = []   # received with the messages, not yet taken

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall((json.dumps(message) + "\n").encode())

    def receive(self) -> dict[str, Any] | None:
        """The next message; None once the daemon closed the socket."""
        while b"\n" not in self.buffer:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, MAX_FDS)
            for fd in fds:
                os.set_inheritable(fd, False)   # never into a restored task
            self.fds += fds
            if not data:
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def take_fd(self) -> int:
        if len(self.fds) != 1:
            raise errors.BugError(f"expected one image file descriptor, got {len(self.fds)}")
        return self.fds.pop()


# An injected call that failed because of what others hold (a file lock, a
# busy resource) is a state the user can change, not a fault of ours.
_BUSY = (errno.EAGAIN, errno.EBUSY)


def error_report(e: BaseException) -> dict[str, Any]:
    if isinstance(e, InjectError):
        return {"kind": "state" if e.errno in _BUSY else "system",
                "message": e.strerror or str(e),
                "context": {"pid": e.filename} if isinstance(e.filename, int) else {}}
    if isinstance(e, errors.ImageError):
        kind = "image"
    elif isinstance(e, errors.UsageError):
        kind = "usage"
    elif isinstance(e, errors.UnsupportedError):
        kind = "unsupported"
    elif isinstance(e, errors.StateError):
        kind = "state"
    elif isinstance(e, errors.NotFoundError):
        kind = "notfound"
    else:
        kind = "system"
    message = e.message if isinstance(e, errors.CkptdError) else f"{type(e).__name__}: {e}"
    ctx = {k: (v if isinstance(v, (int, str, float, bool)) else str(v))
           for k, v in getattr(e, "context", {}).items()}
    return {"kind": kind, "message": message, "context": ctx}


def image_file(ctl: Control, req: dict[str, Any], mode: str) -> BinaryIO:
    """Where the image goes ("wb") or comes from ("rb"): the caller's own
    file if the daemon attached one, else our pipe to the daemon."""
    if req.get("image_fd"):
        return cast(BinaryIO, os.fdopen(ctl.take_fd(), mode, buffering=OUT_BUFFER))
    std = 1 if mode == "wb" else 0
    _grow_pipe(std)
    f = os.fdopen(os.dup(std), mode, buffering=OUT_BUFFER)
    if std == 1:
        os.close(1)   # only `f` holds the pipe now: closing it ends the image
    return cast(BinaryIO, f)


def run_checkpoint(ctl: Control, req: dict[str, Any]) -> None:
    out = image_file(ctl, req, "wb")

    def progress(phase: str, done: int, total: int) -> None:
        ctl.send({"progress": {"phase": phase, "bytes_done": done, "bytes_total": total}})

    pid = req.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        raise errors.UsageError(f"bad pid {pid!r}")
    ignore = req.get("ignore_pids") or []
    externals = req.get("externals") or []
    viewer = req.get("viewer_uid", 0)
    if not isinstance(viewer, int) or viewer < 0:
        raise errors.UsageError(f"bad viewer uid {viewer!r}")
    if not all(isinstance(p, int) for p in ignore) or not all(isinstance(n, str)
                                                              for n in externals):
        raise errors.UsageError("ignore_pids must be pids and externals names")
    # The worker is our own infrastructure: what it holds is not the tree's to lose.
    ignore = [*ignore, os.getpid()]
    with api.checkpointed(pid, out, cgroup=req.get("cgroup"), freezer=req.get("freezer"),
                          source=req.get("source"), progress=progress, ignore_pids=ignore,
                          externals=externals, viewer=viewer) as cp:
        out.close()
        d = cp.dumped
        ctl.send({"dumped": {"bytes": d.bytes, "pages": d.pages, "tasks": d.tasks,
                             "cow_shared_bytes": d.cow_shared_bytes,
                             "frozen_ms": round(d.frozen_ms, 2), "dump_ms": round(d.dump_ms, 2)}})
        try:
            message = ctl.receive()
        except (OSError, ValueError):
            message = None   # the daemon is gone: resume (never leave it stopped)
        kill = message is not None and message.get("finish") == "kill"
        frozen_ms = cp.finish(kill=kill)
        if message is not None:
            ctl.send({"finished": {"frozen_ms": round(frozen_ms, 2)}})


def run_restore(ctl: Control, req: dict[str, Any]) -> None:
    target = req.get("target", "host")
    if target not in ("host", "container"):
        raise errors.UsageError(f"bad restore target {target!r}")
    source = image_file(ctl, req, "rb")

    def stub(need: dict[str, Any]) -> dict[str, Any] | None:
        ctl.send({"need": need})
        answer = ctl.receive()
        if answer is None:
            raise errors.SystemError_("the daemon went away before answering what we need")
        if "stub" not in answer:
            raise errors.UsageError(f"expected a stub answer, got {sorted(answer)}")
        s = answer["stub"]
        if s is None:
            return None
        pid = s.get("pid") if isinstance(s, dict) else None
        if not isinstance(pid, int) or pid <= 0:
            raise errors.UsageError(f"bad stub pid {pid!r}")
        return {"pid": pid, "log_path": str(s.get("log_path") or "")}

    def progress(phase: str, done: int, total: int) -> None:
        ctl.send({"progress": {"phase": phase, "bytes_done": done, "bytes_total": total}})

    with source:
        done = api.restore(source, target=target, stub=stub, progress=progress)
    ctl.send({"restored": {"pid": done.pid, "ns_pid": done.ns_pid,
                           "restore_ms": round(done.restore_ms, 2)}})


def main() -> int:
    logs.configure_from_env()
    ctl = Control(int(os.environ.get(CONTROL_FD_ENV, DEFAULT_CONTROL_FD)))
    started = time.monotonic()
    try:
        req = ctl.receive()
        if req is None:
            return 1
        context = req.get("log_context")
        if isinstance(context, dict):
            structlog.contextvars.bind_contextvars(**context)
        op = req.get("op")
        if op == "checkpoint":
            run_checkpoint(ctl, req)
        elif op == "restore":
            run_restore(ctl, req)
        else:
            raise errors.UsageError(f"unknown op {op!r}")
    except BaseException as e:  # noqa: BLE001 - reported to the daemon, whatever it is
        log.error("worker_failed", error=str(e), exc_info=not isinstance(e, errors.CkptdError))
        try:
            ctl.send({"error": error_report(e)})
        except OSError:
            pass   # the daemon is gone; the exit status says it
        return 1
    log.debug("worker_done", ms=round((time.monotonic() - started) * 1000, 1))
    return 0


def run() -> None:
    code = main()
    # Everything is sent and every file closed: skip the interpreter's
    # teardown, which took ~60 ms that the daemon (and the caller) waited for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
