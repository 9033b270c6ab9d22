"""Restart a container (or a host process tree) from an image stream.

The image goes to an engine worker's stdin as the caller uploads it. The
worker reads the header and says what it needs: for an image of a container,
a new container whose init is the engine's stub (the manager creates it with
the recorded hostname and network); for an image of a host process, nothing
(the worker recreates it with its pid in the host PID namespace, and the
manager adopts it into a container record of its own). When the worker has
restored and detached the tree, the container is registered; if anything
fails, everything created is removed and the first error is reported.

Given a caller's own file (``image_fd``), the worker reads the image from it
itself and nothing is uploaded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import structlog

from ckptd import errors
from ckptd.containers.ahead import Put, read_ahead
from ckptd.containers.manager import ContainerManager
from ckptd.containers.model import ContainerInfo, Network
from ckptd.containers.operations import Kind, Operations
from ckptd.containers.worker import Worker, WorkerPool, error_from

log = structlog.get_logger(__name__)

RESTORE_TIMEOUT = 300.0   # seconds between two messages of a restoring worker
# Uploaded chunks received ahead of the worker's pipe. gRPC takes the next
# message from the client only when the stream is read: reading only when
# the 1 MiB pipe had room made the upload and the engine take turns.
RECEIVE_AHEAD = 8
RECEIVE_AHEAD_POLL = 0.1   # seconds; how soon an abandoned receiver notices


def restart(manager: ContainerManager, operations: Operations, workers: WorkerPool,
            chunks: Iterator[bytes | memoryview], *, name: str = "",
            owner_uid: int = 0, image_fd: int | None = None) -> ContainerInfo:
    """Restart from the uploaded ``chunks``, or from ``image_fd`` (a file of
    the caller's, which stays the caller's to close) if given."""
    local = image_fd is not None
    with operations.track(Kind.RESTART, "") as op, \
            workers.take(image_in=True, pipe=not local) as worker, \
            contextlib.ExitStack() as undo:
        op.update(phase="reading the image" if local else "receiving the image")
        feeder = None if local else _Feeder(worker, chunks, op)
        if feeder is not None:
            feeder.start()
            undo.callback(feeder.stop)
        worker.request({"op": "restore", "target": "container"}, image_fd)
        container: ContainerInfo | None = None
        while True:
            message = _next(worker, feeder)
            if "error" in message:
                raise _upload_error(feeder) or error_from(message["error"])
            if "progress" in message:
                p = message["progress"]
                op.update(phase=p.get("phase"), bytes_total=p.get("bytes_total"))
                if local:   # the worker's count: no bytes pass through here
                    op.update(bytes_done=p.get("bytes_done"))
            elif "need" in message:
                need = message["need"]
                source = need.get("source") or {}
                if source.get("kind") == "container":
                    container = manager.create_stub(
                        name=name or source.get("container_name", ""),
                        hostname=need.get("hostname") or source.get("hostname", ""),
                        network=Network(need.get("network") or source.get("network") or "host"),
                        owner_uid=owner_uid, domainname=need.get("domainname", ""))
                    undo.callback(_discard, manager, container.id)
                    op.container_id = container.id
                    worker.send({"stub": {"pid": container.init_pid,
                                          "log_path": str(manager.log_path(container.id))}})
                else:
                    worker.send({"stub": None})
            elif "restored" in message:
                restored = message["restored"]
                break
        if feeder is not None:
            feeder.join()
            if feeder.error is not None:
                raise feeder.error
        worker.wait()
        if container is not None:
            info = manager.finish_stub(container.id)
        else:
            info = manager.adopt(int(restored["pid"]), name=name, owner_uid=owner_uid)
        undo.pop_all()
        log.info("restart_done", container=info.id, pid=info.init_pid,
                 restore_ms=restored.get("restore_ms"), local_file=local)
        return info


def _next(worker: Worker, feeder: _Feeder | None) -> dict[str, Any]:
    try:
        return worker.receive(RESTORE_TIMEOUT)
    except errors.CkptdError:
        # The worker died: an upload error is the first cause, if there was one.
        upload = _upload_error(feeder)
        if upload is not None:
            raise upload from None
        raise


def _upload_error(feeder: _Feeder | None) -> errors.CkptdError | None:
    return None if feeder is None else feeder.error


def _discard(manager: ContainerManager, cid: str) -> None:
    try:
        manager.delete(cid, force=True)
    except errors.CkptdError as e:
        log.error("restore_cleanup_failed", container=cid, error=str(e))


class _Feeder(threading.Thread):
    """Copies the uploaded chunks into the worker's stdin."""

    def __init__(self, worker: Worker, chunks: Iterator[bytes | memoryview], op) -> None:
        super().__init__(name="restore-feeder", daemon=True)
        self.worker = worker
        self.chunks = chunks
        self.op = op
        self.error: errors.CkptdError | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        pipe = self.worker.proc.stdin
        assert pipe is not None
        received = 0
        try:
            for chunk in _received_ahead(self.chunks, self._halt):
                if self._halt.is_set():
                    return
                pipe.write(chunk)
                received += len(chunk)
                self.op.update(bytes_done=received)
        except BrokenPipeError:
            return  # the worker stopped reading: its own message says why
        except errors.CkptdError as e:
            self.error = e
        except Exception as e:  # noqa: BLE001 - the client's stream broke; say so
            self.error = errors.UsageError(f"the image upload failed: {e}")
        finally:
            try:
                pipe.close()
            except OSError:
                pass  # worker gone: nothing to flush
        if self.error is not None:
            # Without the rest of the image the worker cannot finish: stop it.
            self.worker.proc.kill()

    def stop(self) -> None:
        self._halt.set()


def _received_ahead(chunks: Iterator[bytes | memoryview],
                    halt: threading.Event) -> Iterator[bytes | memoryview]:
    """``chunks``, pulled up to RECEIVE_AHEAD ahead by a thread of their own;
    their error is raised here. Stops pulling once ``halt`` is set or the
    consumer is gone. Not joined: the thread may be waiting for a message
    that never comes (a stalled client); it ends at its next message or the
    call's end."""
    def receive(put: Put) -> None:
        for chunk in chunks:
            if not put(chunk):
                return
    return read_ahead(receive, depth=RECEIVE_AHEAD, poll=RECEIVE_AHEAD_POLL,
                      name="restore-receiver", halt=halt, join=False)
