"""The gRPC servicer: a thin adapter between API messages and the core.

Each method authenticates the caller, translates the request, calls one
function of the container layer, and translates the answer back. Errors are
mapped to status codes in one place (``errors.status_of``); every call logs
one summary line (method, caller, container, duration, result).
"""

from __future__ import annotations

import contextvars
import functools
import os
import secrets
import signal as signals
import threading
import time
from collections.abc import Callable, Generator, Iterator

import grpc
import structlog
from google.protobuf import message_factory
from google.protobuf.timestamp_pb2 import Timestamp

from ckptd import __version__
from ckptd.containers.checkpoint import Complete, Target, checkpoint
from ckptd.containers.manager import ContainerManager
from ckptd.containers.model import ContainerInfo, Network, RunSpec, State
from ckptd.containers.operations import Kind, OperationInfo, Operations
from ckptd.containers.restart import restart
from ckptd.containers.worker import WorkerPool
from ckptd.errors import PermissionError_, UnsupportedError, UsageError
from ckptd.image import decode_bytes_field, encode_bytes_field
from ckptd.server.auth import IMAGE_IN, IMAGE_OUT, LocalFiles, Peer, PeerTable
from ckptd.server.confirmations import Confirmations
from ckptd.server.errors import status_of
from ckptd.v1 import api_pb2 as pb
from ckptd.v1 import api_pb2_grpc

log = structlog.get_logger(__name__)

DEFAULT_FREEZE_TIMEOUT = 10.0  # seconds; a healthy tree freezes in milliseconds
LOG_CHUNK = 64 * 1024
LOG_FOLLOW_POLL = 0.2          # seconds between looks at a growing log
SERVICE = pb.DESCRIPTOR.services_by_name["Ckptd"]
# Field numbers of the image bytes in ImageChunk and RestartRequest.
CHUNK_DATA = pb.ImageChunk.DESCRIPTOR.fields_by_name["data"].number
RESTART_DATA = pb.RestartRequest.DESCRIPTOR.fields_by_name["data"].number

_STATES = {State.RUNNING: pb.CONTAINER_STATE_RUNNING, State.FROZEN: pb.CONTAINER_STATE_FROZEN,
           State.EXITED: pb.CONTAINER_STATE_EXITED, State.LOST: pb.CONTAINER_STATE_LOST}
_NETWORKS = {Network.HOST: pb.NETWORK_MODE_HOST, Network.NEW: pb.NETWORK_MODE_NEW}
_KINDS = {Kind.CHECKPOINT: pb.OPERATION_KIND_CHECKPOINT, Kind.RESTART: pb.OPERATION_KIND_RESTART,
          Kind.MIGRATE: pb.OPERATION_KIND_MIGRATE, Kind.FREEZE: pb.OPERATION_KIND_FREEZE,
          Kind.THAW: pb.OPERATION_KIND_THAW}


def _timestamp(t: float | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def container_message(c: ContainerInfo) -> pb.Container:
    return pb.Container(
        id=c.id, name=c.name, state=_STATES[c.state],
        exit_code=c.exit_code or 0, exit_signal=c.exit_signal or 0,
        init_pid=c.init_pid, init_ns_pid=c.init_ns_pid, num_tasks=c.num_tasks,
        rss_bytes=c.rss_bytes, cgroup_path=c.cgroup_path,
        started_at=_timestamp(c.started_at), exited_at=_timestamp(c.exited_at),
        argv=list(c.argv), hostname=c.hostname, network=_NETWORKS[c.network],
        tty=c.tty, notes=list(c.notes), owner_uid=c.owner_uid,
    )


def operation_message(op: OperationInfo) -> pb.Operation:
    return pb.Operation(id=op.id, kind=_KINDS[op.kind], container_id=op.container_id,
                        phase=op.phase, bytes_done=op.bytes_done, bytes_total=op.bytes_total,
                        started_at=_timestamp(op.started_at))


def run_spec(req: pb.RunRequest, caller: Peer) -> RunSpec:
    if not req.argv:
        raise UsageError("run needs a command (argv is empty)")
    for entry in req.env:
        if "=" not in entry or entry.startswith("="):
            raise UsageError(f"environment entry {entry!r} is not KEY=VALUE")
    if req.cwd and not req.cwd.startswith("/"):
        raise UsageError(f"cwd must be an absolute path, not {req.cwd!r}")
    network = Network.NEW if req.network == pb.NETWORK_MODE_NEW else Network.HOST
    # A caller runs containers as itself: the daemon lends namespaces and a
    # cgroup, never its own privilege.
    return RunSpec(argv=tuple(req.argv), name=req.name, env=tuple(req.env), cwd=req.cwd or "/",
                   hostname=req.hostname, network=network, tty=req.tty,
                   uid=caller.uid, gid=caller.gid)


def _log_fields(request: object) -> dict[str, object]:
    fields: dict[str, object] = {}
    for name in ("id", "name", "pid"):
        value = getattr(request, name, None)
        if value:
            fields["container" if name == "id" else name] = value
    return fields


class _Once:
    """Who writes a call's summary line: the first to claim it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.done = False

    def claim(self) -> bool:
        with self._lock:
            first, self.done = not self.done, True
            return first


def _rpc(stream: bool = False) -> Callable:
    """Authenticate, bind log context, map errors and log one summary line."""

    def wrap(method: Callable) -> Callable:
        name = method.__name__

        def begin(self: Servicer, request: object, context: grpc.ServicerContext) -> Peer:
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(op=secrets.token_hex(4), method=name,
                                                   **_log_fields(request))
            caller = self.peers.resolve(context)
            structlog.contextvars.bind_contextvars(caller=caller.describe())
            return caller

        def finish(start: float, context: grpc.ServicerContext, error: BaseException | None) -> None:
            ms = round((time.monotonic() - start) * 1000, 2)
            if error is None:
                log.info("rpc", result="OK", ms=ms)
                return
            code, message = status_of(error)
            if code is grpc.StatusCode.INTERNAL:
                log.error("rpc", result=code.name, ms=ms, error=message, exc_info=error)
            else:
                log.info("rpc", result=code.name, ms=ms, error=message)
            context.abort(code, message)

        if stream:
            @functools.wraps(method)
            def streaming(self: Servicer, request: object, context: grpc.ServicerContext) -> Iterator:
                start = time.monotonic()
                summary = _Once()
                inner: list[Generator] = []

                def abandoned(bound: contextvars.Context) -> None:
                    # A caller that cancels while we wait at a yield leaves us
                    # there for good: gRPC pulls no more. Closing the method's
                    # generator runs its cleanup (a checkpoint resumes its tree).
                    if summary.done:
                        return
                    try:
                        for gen in inner:
                            gen.close()
                    except ValueError:
                        return   # running in gRPC's thread: it sees the end itself
                    if summary.claim():
                        bound.run(log.info, "rpc", result="CANCELLED",
                                  ms=round((time.monotonic() - start) * 1000, 2))

                try:
                    caller = begin(self, request, context)
                    inner.append(method(self, request, context, caller))
                    context.add_callback(functools.partial(abandoned, contextvars.copy_context()))
                    yield from inner[0]
                except Exception as e:  # every failure becomes a status, none a crash
                    if summary.claim():
                        finish(start, context, e)
                else:
                    if summary.claim():
                        finish(start, context, None)
            return streaming

        @functools.wraps(method)
        def unary(self: Servicer, request: object, context: grpc.ServicerContext) -> object:
            start = time.monotonic()
            try:
                caller = begin(self, request, context)
                result = method(self, request, context, caller)
            except Exception as e:  # every failure becomes a status, none a crash
                finish(start, context, e)
            finish(start, context, None)
            return result
        return unary
    return wrap


class Servicer(api_pb2_grpc.CkptdServicer):
    def __init__(self, manager: ContainerManager, operations: Operations, workers: WorkerPool,
                 peers: PeerTable, daemon_info: pb.DaemonInfo,
                 local_files: LocalFiles | None = None) -> None:
        self.manager = manager
        self.workers = workers
        self.operations = operations
        self.peers = peers
        self.daemon_info = daemon_info
        self.local_files = LocalFiles() if local_files is None else local_files
        self.confirmations = Confirmations()

    def _local_file(self, token: str, mode: str, caller: Peer) -> int | None:
        """The caller's own file behind ``token`` (ours to close), if one was named."""
        return self.local_files.take(token, mode, caller) if token else None

    def _owned(self, ref: str, caller: Peer) -> ContainerInfo:
        """The container ``ref``, if the caller may act on it."""
        info = self.manager.get(ref)
        if not caller.is_root and info.owner_uid != caller.uid:
            raise PermissionError_(f"container {info.id} belongs to uid {info.owner_uid}, "
                                   f"not to the caller (uid {caller.uid})")
        return info

    @_rpc()
    def Run(self, request, context, caller):
        info = self.manager.run(run_spec(request, caller))
        structlog.contextvars.bind_contextvars(container=info.id)
        return container_message(info)

    @_rpc()
    def List(self, request, context, caller):
        found = [c for c in self.manager.list()
                 if (caller.is_root or c.owner_uid == caller.uid)
                 and not (request.running_only and c.state in (State.EXITED, State.LOST))]
        return pb.ListResponse(containers=[container_message(c) for c in found])

    @_rpc()
    def Status(self, request, context, caller):
        if not request.id:
            ops = self.operations.list() if caller.is_root else []
            return pb.StatusResponse(daemon=self.daemon_info,
                                     operations=[operation_message(o) for o in ops])
        info = self._owned(request.id, caller)
        return pb.StatusResponse(container=container_message(info), daemon=self.daemon_info,
                                 operations=[operation_message(o)
                                             for o in self.operations.list(info.id)])

    @_rpc()
    def Freeze(self, request, context, caller):
        return self._freezer_call(request, caller, Kind.FREEZE, "freezing", self.manager.freeze)

    @_rpc()
    def Thaw(self, request, context, caller):
        return self._freezer_call(request, caller, Kind.THAW, "thawing", self.manager.thaw)

    def _freezer_call(self, request, caller: Peer, kind: Kind, phase: str,
                      call: Callable[[str, float], ContainerInfo]) -> pb.Container:
        info = self._owned(request.id, caller)
        with self.operations.track(kind, info.id) as op:
            op.update(phase=phase)
            return container_message(call(info.id,
                                          request.timeout_seconds or DEFAULT_FREEZE_TIMEOUT))

    @_rpc()
    def Kill(self, request, context, caller):
        info = self._owned(request.id, caller)
        sig = request.signal or signals.SIGTERM
        if not 0 < sig < signals.SIGRTMAX + 1:
            raise UsageError(f"signal {sig} is not a valid signal number")
        if request.timeout_seconds < 0:
            raise UsageError("timeout must not be negative")
        return container_message(self.manager.kill(info.id, sig, request.timeout_seconds))

    @_rpc()
    def Delete(self, request, context, caller):
        info = self._owned(request.id, caller)
        self.manager.delete(info.id, force=request.force)
        return pb.DeleteResponse(id=info.id)

    @_rpc(stream=True)
    def Logs(self, request, context, caller):
        info = self._owned(request.id, caller)
        path = self.manager.log_path(info.id)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return  # the container never wrote anything
        with f:
            while True:
                data = f.read(LOG_CHUNK)
                if data:
                    yield pb.LogChunk(data=data)
                    continue
                if not request.follow or not context.is_active():
                    return
                if self.manager.get(info.id).state in (State.EXITED, State.LOST):
                    rest = f.read()
                    if rest:
                        yield pb.LogChunk(data=rest)
                    return
                time.sleep(LOG_FOLLOW_POLL)

    @_rpc(stream=True)
    def Checkpoint(self, request, context, caller):
        image_fd = self._local_file(request.local_output_token, IMAGE_OUT, caller)
        items: Generator[bytes | Complete, None, None] | None = None
        # A tree to be killed waits, stopped, for the caller's confirmation.
        confirmation = None if request.leave_running else self.confirmations.open(caller)
        try:
            which = request.WhichOneof("target")
            if which == "id":
                target = Target(container=self._owned(request.id, caller).id,
                                externals=tuple(request.external), viewer_uid=caller.uid)
            elif which == "pid":
                if not caller.is_root:
                    raise PermissionError_("only root may checkpoint host processes by pid")
                target = Target(pid=request.pid, externals=tuple(request.external))
            else:
                raise UsageError("checkpoint needs a container id or a pid")
            wait_ack = None if confirmation is None else \
                functools.partial(confirmation.wait, caller_waits=context.is_active)
            # With a file of the caller's, only the Complete message is
            # yielded: the engine writes the image there itself.
            items = checkpoint(self.manager, self.operations, self.workers, target,
                               request.leave_running, image_fd=image_fd,
                               caller_waits=context.is_active, wait_ack=wait_ack)
            for item in items:
                if isinstance(item, Complete):
                    token = confirmation.token if item.awaiting_ack and confirmation else ""
                    yield pb.ImageChunk(complete=pb.ImageComplete(
                        bytes=item.bytes, confirm_token=token,
                        confirm_timeout_seconds=round(item.ack_timeout))).SerializeToString()
                else:
                    yield encode_bytes_field(CHUNK_DATA, item)   # a serialized ImageChunk
        finally:
            if items is not None:
                items.close()   # abandoned (see _rpc): its own cleanup resumes the tree
            if confirmation is not None:
                self.confirmations.close(confirmation)
            if image_fd is not None:
                os.close(image_fd)

    @_rpc()
    def ConfirmCheckpoint(self, request, context, caller):
        self.confirmations.confirm(request.token, caller, request.bytes)
        return pb.ConfirmCheckpointResponse()

    @_rpc()
    def Restart(self, request_iterator, context, caller):
        if not caller.is_root:
            # The image decides the restored credentials; until they are checked
            # against the caller's, only root may restore.
            raise PermissionError_("only root may restart from an image for now")
        first = next(request_iterator, None)
        if not isinstance(first, pb.RestartRequest) or first.WhichOneof("part") != "options":
            raise UsageError("a restart stream starts with its options message")
        image_fd = self._local_file(first.options.local_input_token, IMAGE_IN, caller)
        try:
            # A client reading a local file half-closes right after the options.
            if image_fd is not None and next(request_iterator, None) is not None:
                raise UsageError("a restart from a local file takes no image data messages")
            info = restart(self.manager, self.operations, self.workers,
                           _image_data(request_iterator), name=first.options.name,
                           owner_uid=caller.uid, image_fd=image_fd)
        finally:
            if image_fd is not None:
                os.close(image_fd)
        structlog.contextvars.bind_contextvars(container=info.id)
        return container_message(info)

    @_rpc()
    def Migrate(self, request, context, caller):
        raise UnsupportedError("migrate is not implemented yet; meanwhile pipe a checkpoint "
                               "into a restart: ckptctl checkpoint ID -o - | "
                               "ckptctl --address DEST restart -i -")


def add_to_server(servicer: Servicer, server: grpc.Server) -> None:
    """What the generated ``add_CkptdServicer_to_server`` does, except that image
    chunks cross gRPC in their wire form: ``Checkpoint`` yields serialized
    ImageChunks, ``Restart`` gets the data of RestartRequests as views of the
    received bytes (see ``ckptd.image.chunks``: protobuf objects cost two
    copies of every chunk into fresh memory)."""
    wire = {"Checkpoint": (None, _serialized), "Restart": (_restart_request, None)}
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    handlers = {}
    for method in SERVICE.methods:
        parse, serialize = wire.get(method.name, (None, None))
        handlers[method.name] = kinds[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=parse or message_factory.GetMessageClass(
                method.input_type).FromString,
            response_serializer=serialize or message_factory.GetMessageClass(
                method.output_type).SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _serialized(message: bytes) -> bytes:
    return message


def _restart_request(raw: bytes) -> pb.RestartRequest | memoryview:
    """A data message as the view of its bytes; anything else parsed."""
    data = decode_bytes_field(raw, RESTART_DATA)
    return data if data is not None else pb.RestartRequest.FromString(raw)


def _image_data(parts: Iterator[pb.RestartRequest | memoryview]) -> Iterator[memoryview | bytes]:
    for part in parts:
        if isinstance(part, memoryview):
            yield part
        elif part.WhichOneof("part") == "data":
            yield part.data


def daemon_info(manager: ContainerManager, state_dir: str, cgroup_root: str) -> pb.DaemonInfo:
    return pb.DaemonInfo(version=__version__, freezer_backend=manager.backend_name,
                         cgroup_root=cgroup_root, state_dir=state_dir, pid=os.getpid(),
                         started_at=_timestamp(time.time()))
