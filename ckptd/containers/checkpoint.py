"""Checkpoint a container (or a host process tree) into an image stream.

The engine runs in a worker process and writes the image to its stdout; this
module hands the bytes on as they come (the daemon never holds the image),
tracks progress for ``Status``, and once the whole image has gone out tells
the worker to resume the tree (``leave_running``) or, once the caller has
confirmed it holds the image, kill it. If anything fails, or the caller goes
away or never confirms, the tree is resumed: a failed checkpoint leaves it
running as if nothing happened, and no image is lost with its processes.

Given a caller's own file (``image_fd``), the worker writes the image there
itself and nothing is yielded; progress then comes from the worker's reports.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from ckptd import errors
from ckptd.containers.manager import ContainerManager
from ckptd.containers.model import State
from ckptd.containers.operations import Kind, Operations
from ckptd.containers.worker import Worker, WorkerPool, error_from
from ckptd.engine import leaks
from ckptd.kernel import procfs

log = structlog.get_logger(__name__)

# Seconds for the worker to resume or kill the tree once told to.
FINISH_TIMEOUT = 30.0
# Seconds a stopped tree waits for the caller to confirm it holds the whole
# image (written and fsynced) before it is killed; then it is resumed instead.
ACK_TIMEOUT = 60.0
KILLED_NOTE = "checkpointed and stopped (its image was sent to the caller)"


@dataclass(frozen=True)
class Complete:
    """The last item of a checkpoint: the image is whole, ``bytes`` long; if
    ``awaiting_ack``, the tree stays stopped until the caller confirms."""

    bytes: int
    awaiting_ack: bool
    ack_timeout: float = ACK_TIMEOUT


@dataclass(frozen=True)
class Target:
    """What to checkpoint: a container of ours, or a host process by pid;
    ``externals`` names resources shared with outside processes to accept
    as private copies (ckptd/engine/leaks.py)."""

    container: str = ""
    pid: int = 0
    externals: tuple[str, ...] = ()
    viewer_uid: int = 0        # the caller: a refusal names only what it may see


def checkpoint(manager: ContainerManager, operations: Operations, workers: WorkerPool,
               target: Target, leave_running: bool, *, image_fd: int | None = None,
               caller_waits: Callable[[], bool] = lambda: True,
               wait_ack: Callable[[float], int | None] | None = None
               ) -> Iterator[bytes | Complete]:
    """Image bytes, in chunks, as the engine produces them (none if the
    engine writes them into ``image_fd``, which stays the caller's to close),
    then a ``Complete``. ``caller_waits`` False once the caller has gone away.
    ``wait_ack(timeout)``: the byte count the caller confirms it holds, None
    if it does not within ``timeout``; a tree to be killed is killed only
    after a right one (without ``wait_ack``, as soon as the image is out)."""
    request, container_id = _request(manager, target)
    local = image_fd is not None
    with operations.track(Kind.CHECKPOINT, container_id or f"pid:{target.pid}") as op, \
            workers.take(image_in=False, pipe=not local) as worker:
        op.update(phase="starting the engine")
        worker.request(request, image_fd)
        sent = 0
        dumped: dict[str, Any] | None = None
        finished = False
        try:
            if not local:
                for kind, item in worker.events():
                    if kind == "data":
                        sent += len(item)
                        op.update(bytes_done=sent)
                        yield item
                        continue
                    dumped = _control(item, op) or dumped
            while dumped is None:
                # No timeout with a file: the dump itself happens meanwhile.
                dumped = _control(worker.receive(None if local else FINISH_TIMEOUT), op, local)
            if local:
                sent = int(dumped.get("bytes", 0))
                op.update(bytes_done=sent)
                # Nothing was yielded, so nothing noticed a caller that went
                # away: it must find its target running, as after a cancel.
                if not caller_waits():
                    raise errors.StateError("the caller went away before the checkpoint "
                                            "was complete")
            awaiting = wait_ack is not None and not leave_running
            if awaiting:
                assert wait_ack is not None
                yield Complete(sent, True)
                op.update(phase="waiting for the caller to confirm it has the image")
                _check_ack(wait_ack(ACK_TIMEOUT), sent)
            op.update(phase="finishing")
            worker.send({"finish": "resume" if leave_running else "kill"})
            while True:
                reply = worker.receive(FINISH_TIMEOUT)
                if "finished" in reply:
                    break
                _control(reply, op)
            finished = True
            worker.wait()
        finally:
            if not finished:
                # Failed or abandoned mid-way: the worker resumes the tree when
                # its control socket closes before a finish message.
                worker.control.close()
                _wait_quietly(worker)
                if container_id:
                    manager.thaw_after_failure(container_id)
        if not leave_running and container_id:
            manager.note(container_id, KILLED_NOTE)
        log.info("checkpoint_done", container=container_id or None, pid=target.pid or None,
                 bytes=sent, leave_running=leave_running, local_file=local,
                 **_figures(dumped, reply))
        if not awaiting:
            # Said once the tree runs again (or is gone): not worth its stopped time.
            yield Complete(sent, False)


def _check_ack(acked: int | None, sent: int) -> None:
    if acked is None:
        raise errors.StateError(f"the caller did not confirm within {ACK_TIMEOUT:g} s that it "
                                "had the whole image; the processes were resumed, not killed")
    if acked != sent:
        raise errors.StateError(f"the caller confirmed {acked} bytes of a {sent} byte image; "
                                "the processes were resumed, not killed")


def _request(manager: ContainerManager, target: Target) -> tuple[dict[str, Any], str]:
    externals = sorted(leaks.parse_externals(target.externals))   # typos: before any work
    if target.container:
        info = manager.get(target.container)
        if info.state != State.RUNNING:
            raise errors.StateError(f"container {info.id} is {info.state.value}; only a "
                                    "running container can be checkpointed (thaw it first)")
        source = {"kind": "container", "container_id": info.id, "container_name": info.name,
                  "hostname": info.hostname, "network": info.network.value,
                  "log_path": str(manager.log_path(info.id))}
        # What ckptd itself holds of a container (the shim: its log and
        # pty; the daemon) is expected, not a leak.
        ours = [pid for pid in (manager.shim_pid(info.id), os.getpid()) if pid]
        return ({"op": "checkpoint", "pid": info.init_pid, "cgroup": info.cgroup_path,
                 "freezer": manager.freezer_name(info.id), "source": source,
                 "ignore_pids": ours, "externals": externals,
                 "viewer_uid": target.viewer_uid}, info.id)
    if target.pid <= 0:
        raise errors.UsageError(f"bad pid {target.pid}")
    try:
        procfs.read_stat(target.pid)
    except ProcessLookupError:
        raise errors.NotFoundError(f"no process with pid {target.pid}") from None
    if target.pid == 1:
        raise errors.UsageError("refusing to checkpoint pid 1 of the host")
    return ({"op": "checkpoint", "pid": target.pid, "cgroup": None, "freezer": None,
             "source": {"kind": "host"}, "ignore_pids": [os.getpid()],
             "externals": externals, "viewer_uid": target.viewer_uid}, "")


def _control(message: dict[str, Any], op, count_bytes: bool = False) -> dict[str, Any] | None:
    """Apply one control message; the ``dumped`` report when it is that.
    ``count_bytes``: the image bytes are not seen here, take the worker's count."""
    if "error" in message:
        raise error_from(message["error"])
    if "progress" in message:
        p = message["progress"]
        op.update(phase=p.get("phase"), bytes_total=p.get("bytes_total"))
        if count_bytes:
            op.update(bytes_done=p.get("bytes_done"))
        return None
    if "dumped" in message:
        return message["dumped"]
    log.debug("worker_message_ignored", message=message)
    return None


def _figures(dumped: dict[str, Any] | None, finished: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for source in (dumped or {}), ((finished or {}).get("finished") or {}):
        for key, value in source.items():
            if key.endswith("_ms") or key in ("pages", "tasks", "cow_shared_bytes"):
                out[key] = value
    return out


def _wait_quietly(worker: Worker) -> None:
    try:
        worker.wait()
    except errors.TimeoutError_:
        log.error("worker_did_not_exit", worker_pid=worker.proc.pid)
