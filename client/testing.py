"""An in-process fake ckptd, for testing code that uses the client library.

    with fake_daemon("/tmp/x/ckptd.sock") as fake:
        with Client("/tmp/x/ckptd.sock") as c:
            c.run(["sleep", "1"])
        assert fake.requests[0][0] == "Run"

``FakeCkptd`` keeps containers in a dict and implements every RPC in the
simplest way that honours the API's contract (states, status codes, the
restart stream's options-first rule); ``fail`` makes any RPC return a chosen
status. Nothing here touches processes or cgroups, so it needs no privilege.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ckptd.v1 import api_pb2, api_pb2_grpc

from .address import MAX_MESSAGE_BYTES
from .client import HEALTH_SERVICE

# Fixed so that tests can compute ages: 2023-11-14 22:13:20 UTC.
STARTED_AT = 1_700_000_000
FAKE_CHUNK_BYTES = 1024 * 1024
# How long a fake checkpoint to be killed waits for its confirmation.
FAKE_CONFIRM_SECONDS = 5


def fake_image(size: int) -> bytes:
    """Deterministic, incompressible bytes of ``size``, standing in for an image."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "little")).digest() * 64
        counter += 1
    return bytes(out[:size])


def canned_containers() -> dict[str, api_pb2.Container]:
    """Three containers, one per common state."""
    def make(cid: str, name: str, state: api_pb2.ContainerState, **kw: object) -> api_pb2.Container:
        c = api_pb2.Container(id=cid, name=name, state=state, cgroup_path=f"/sys/fs/cgroup/ckptd/{cid}",
                              network=api_pb2.NETWORK_MODE_HOST, **kw)  # type: ignore[arg-type]
        c.started_at.seconds = STARTED_AT
        return c

    web = make("c0ffee01", "web", api_pb2.CONTAINER_STATE_RUNNING, init_pid=4242, init_ns_pid=1,
               num_tasks=3, rss_bytes=12 * 1024 * 1024, argv=["python3", "-m", "http.server"],
               hostname="web")
    cold = make("c0ffee02", "cold", api_pb2.CONTAINER_STATE_FROZEN, init_pid=4343, init_ns_pid=1,
                num_tasks=1, rss_bytes=1536, argv=["sleep", "1000"],
                notes=["cgroup was found frozen after a daemon restart"])
    done = make("c0ffee03", "", api_pb2.CONTAINER_STATE_EXITED, exit_signal=9, argv=["yes"])
    done.exited_at.seconds = STARTED_AT + 60
    return {c.id: c for c in (web, cold, done)}


@dataclass
class RestartRecord:
    """What one Restart call received."""

    options: api_pb2.RestartOptions | None = None
    options_first: bool = False
    data: bytearray = field(default_factory=bytearray)
    messages: int = 0


class FakeCkptd(api_pb2_grpc.CkptdServicer):
    """A ckptd servicer with canned containers and no kernel behind it."""

    def __init__(self, image_bytes: int = 3 * FAKE_CHUNK_BYTES + 12345) -> None:
        self.containers = canned_containers()
        self.image = fake_image(image_bytes)
        self.logs = b"line one\nline two\n"
        # RPC name ("Run", "Checkpoint", ...) -> the status it fails with.
        self.fail: dict[str, tuple[grpc.StatusCode, str]] = {}
        # Abort a Checkpoint stream with INTERNAL once this many bytes went out.
        self.fail_checkpoint_after: int | None = None
        # Abort a Restart with INTERNAL once this many image bytes came in.
        self.fail_restart_after: int | None = None
        # Seconds Migrate takes, to watch its progress.
        self.migrate_seconds = 0.0
        self.operations: list[api_pb2.Operation] = []
        self.requests: list[tuple[str, Message]] = []
        self.restarts: list[RestartRecord] = []
        # Set when a Checkpoint call ends before the whole image was sent.
        self.checkpoint_cancelled = threading.Event()
        # Each kill-mode checkpoint's confirmation: the byte count, None if none came.
        self.checkpoint_acks: list[int | None] = []
        self._confirmations: dict[str, queue.Queue[int]] = {}
        self._next_id = 100
        self._lock = threading.Lock()

    # -- helpers ----------------------------------------------------------------

    def _enter(self, name: str, request: Message, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.requests.append((name, request))
        if name in self.fail:
            code, message = self.fail[name]
            context.abort(code, message)

    def _find(self, ref: str, context: grpc.ServicerContext) -> api_pb2.Container:
        for c in self.containers.values():
            if ref and ref in (c.id, c.name):
                return c
        context.abort(grpc.StatusCode.NOT_FOUND, f"no container {ref!r}")
        raise AssertionError("abort returned")

    def _new(self, name: str, argv: Iterable[str] = ()) -> api_pb2.Container:
        with self._lock:
            self._next_id += 1
            cid = f"c0ffee{self._next_id}"
        c = api_pb2.Container(id=cid, name=name, state=api_pb2.CONTAINER_STATE_RUNNING,
                              init_pid=5000 + self._next_id, init_ns_pid=1, num_tasks=1,
                              argv=list(argv))
        c.started_at.seconds = STARTED_AT
        self.containers[cid] = c
        return c

    # -- lifecycle ----------------------------------------------------------------

    def Run(self, request, context):  # noqa: N802 - gRPC method names
        self._enter("Run", request, context)
        if any(c.name == request.name for c in self.containers.values() if request.name):
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"name {request.name!r} is taken")
        c = self._new(request.name, request.argv)
        c.hostname = request.hostname or request.name or c.id
        c.network = request.network
        c.tty = request.tty
        return c

    def List(self, request, context):  # noqa: N802
        self._enter("List", request, context)
        running = (api_pb2.CONTAINER_STATE_RUNNING, api_pb2.CONTAINER_STATE_FROZEN)
        return api_pb2.ListResponse(containers=[
            c for c in self.containers.values() if not request.running_only or c.state in running
        ])

    def Status(self, request, context):  # noqa: N802
        self._enter("Status", request, context)
        reply = api_pb2.StatusResponse()
        if request.id:
            c = self._find(request.id, context)
            reply.container.CopyFrom(c)
            reply.operations.extend(op for op in self.operations if op.container_id == c.id)
        else:
            reply.operations.extend(self.operations)
        reply.daemon.version = "0.1.0-fake"
        reply.daemon.freezer_backend = "cgroup2"
        reply.daemon.cgroup_root = "/sys/fs/cgroup/ckptd"
        reply.daemon.state_dir = "/var/lib/ckptd"
        reply.daemon.pid = 1234
        reply.daemon.started_at.seconds = STARTED_AT
        return reply

    def Freeze(self, request, context):  # noqa: N802
        self._enter("Freeze", request, context)
        c = self._find(request.id, context)
        if c.state != api_pb2.CONTAINER_STATE_RUNNING:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"container {c.id} is not running")
        c.state = api_pb2.CONTAINER_STATE_FROZEN
        return c

    def Thaw(self, request, context):  # noqa: N802
        self._enter("Thaw", request, context)
        c = self._find(request.id, context)
        if c.state != api_pb2.CONTAINER_STATE_FROZEN:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"container {c.id} is not frozen")
        c.state = api_pb2.CONTAINER_STATE_RUNNING
        return c

    def Kill(self, request, context):  # noqa: N802
        self._enter("Kill", request, context)
        c = self._find(request.id, context)
        c.state = api_pb2.CONTAINER_STATE_EXITED
        c.exit_signal = request.signal or 15
        return c

    def Delete(self, request, context):  # noqa: N802
        self._enter("Delete", request, context)
        c = self._find(request.id, context)
        if c.state != api_pb2.CONTAINER_STATE_EXITED and not request.force:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"container {c.id} is still running (use force)")
        del self.containers[c.id]
        return api_pb2.DeleteResponse(id=c.id)

    def Logs(self, request, context):  # noqa: N802
        self._enter("Logs", request, context)
        self._find(request.id, context)
        for line in self.logs.splitlines(keepends=True):
            yield api_pb2.LogChunk(data=line)

    # -- checkpoint / restart -----------------------------------------------------------

    def Checkpoint(self, request, context):  # noqa: N802
        self._enter("Checkpoint", request, context)
        if request.WhichOneof("target") == "id":
            self._find(request.id, context)
        elif request.pid <= 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no container id or pid")
        finished = threading.Event()

        def on_end() -> None:
            if not finished.is_set():
                self.checkpoint_cancelled.set()

        context.add_callback(on_end)
        sent = 0
        for start in range(0, len(self.image), FAKE_CHUNK_BYTES):
            if self.fail_checkpoint_after is not None and sent >= self.fail_checkpoint_after:
                finished.set()
                context.abort(grpc.StatusCode.INTERNAL, "dumping memory of pid 4242 failed: EIO")
            chunk = self.image[start:start + FAKE_CHUNK_BYTES]
            sent += len(chunk)
            yield api_pb2.ImageChunk(data=chunk)
        token = "" if request.leave_running else f"token-{len(self.checkpoint_acks)}"
        if token:
            self._confirmations[token] = queue.Queue(1)
        yield api_pb2.ImageChunk(complete=api_pb2.ImageComplete(
            bytes=sent, confirm_token=token, confirm_timeout_seconds=FAKE_CONFIRM_SECONDS))
        if token:
            acked = None
            deadline = time.monotonic() + FAKE_CONFIRM_SECONDS
            while acked is None and context.is_active() and time.monotonic() < deadline:
                try:
                    acked = self._confirmations[token].get(timeout=0.05)
                except queue.Empty:
                    continue
            del self._confirmations[token]
            self.checkpoint_acks.append(acked)
            if acked != sent:
                finished.set()
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              "the caller did not confirm it had the whole image")
        finished.set()

    def ConfirmCheckpoint(self, request, context):  # noqa: N802
        # Not in ``requests``: part of the Checkpoint it confirms.
        waiting = self._confirmations.get(request.token)
        if waiting is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no checkpoint waits for this confirmation")
        waiting.put(request.bytes)
        return api_pb2.ConfirmCheckpointResponse()

    def Restart(self, request_iterator, context):  # noqa: N802
        record = RestartRecord()
        self.restarts.append(record)
        for i, message in enumerate(request_iterator):
            record.messages += 1
            part = message.WhichOneof("part")
            if part == "options":
                if i != 0:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "options after image data")
                record.options = message.options
                record.options_first = True
            elif part == "data":
                if i == 0:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be options")
                record.data += message.data
                if self.fail_restart_after is not None and len(record.data) >= self.fail_restart_after:
                    context.abort(grpc.StatusCode.INTERNAL, "restoring memory of pid 1 failed: ENOMEM")
        self._enter("Restart", record.options or api_pb2.RestartOptions(), context)
        if not record.data:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad image: empty stream at byte offset 0")
        name = record.options.name if record.options else ""
        return self._new(name, ["restored"])

    def Migrate(self, request, context):  # noqa: N802
        self._enter("Migrate", request, context)
        c = self._find(request.id, context)
        time.sleep(self.migrate_seconds)
        if not request.leave_running:
            c.state = api_pb2.CONTAINER_STATE_EXITED
            c.exit_signal = 9
        moved = api_pb2.Container()
        moved.CopyFrom(c)
        moved.id = "d0ffee01"
        moved.state = api_pb2.CONTAINER_STATE_RUNNING
        moved.exit_signal = 0
        return api_pb2.MigrateResponse(container=moved)


@contextlib.contextmanager
def fake_daemon(socket_path: str, servicer: FakeCkptd | None = None) -> Iterator[FakeCkptd]:
    """Serve ``servicer`` (default: a new ``FakeCkptd``) on a unix socket, with health."""
    servicer = servicer or FakeCkptd()
    server = grpc.server(
        ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
    )
    api_pb2_grpc.add_CkptdServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port("unix:" + socket_path)
    server.start()
    try:
        yield servicer
    finally:
        server.stop(grace=None)
