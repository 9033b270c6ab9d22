"""``Client``: the typed Python API of ckptd, one method per RPC.

Methods return the generated protobuf messages (typed by ``api_pb2.pyi``) and
raise ``ClientError`` subclasses (see ``errors``); no ``grpc.RpcError`` gets
out. Short calls have a deadline (``timeout``, plus the time the daemon is
asked to wait, for freeze/thaw/kill); transfers (logs, checkpoint, restart,
migrate) have none, since they last as long as the image is big.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ckptd.v1 import api_pb2, api_pb2_grpc

from .address import Address, TlsFiles, default_address, open_channel, parse_address
from .errors import ClientError, Internal, InvalidArgument, from_rpc_error
from .transfer import (
    IMAGE_IN, IMAGE_OUT, LOCAL_FILES_ENV, PathOrFile, ProgressFn,
    atomic_output, counted, make_durable,
    file_offset, hand_over, image_chunk_data, is_path, read_chunks, rechunk, regular_fd,
    restart_data, restart_request_bytes, write_chunks,
)

Container = api_pb2.Container
StatusResponse = api_pb2.StatusResponse
Operation = api_pb2.Operation

# The name the daemon registers with the standard gRPC health service.
HEALTH_SERVICE = "ckptd.v1.Ckptd"

# Freeze/thaw wait for the cgroup for this long when not told (the API's default).
DEFAULT_STATE_TIMEOUT = 10.0

# How often migrate() asks Status for the operation's progress: often enough
# for a progress line, rare enough to cost the daemon nothing. Also how long a
# blocking wait sleeps between checks, so Ctrl-C is noticed.
POLL_SECONDS = 1.0
# How often a transfer through a local file reports progress (read from the
# file's offset, which the engine moves as it writes or reads).
LOCAL_PROGRESS_SECONDS = 0.2

_NETWORKS = {
    "host": api_pb2.NETWORK_MODE_HOST,
    "new": api_pb2.NETWORK_MODE_NEW,
}

_Response = TypeVar("_Response")


class Client:
    """A connection to one ckptd daemon.

    ``address`` is a unix socket path (default ``$CKPTD_ADDRESS``, then
    ``/run/ckptd/ckptd.sock``) or ``host:port``, which needs ``tls_cert`` and
    ``tls_key`` (our identity) and normally ``tls_ca`` (to verify the daemon),
    unless ``insecure`` is set, which only loopback accepts. ``timeout`` is
    the deadline of short calls in seconds (None: no deadline).

    On a unix socket, checkpoints to and restarts from regular files let the
    daemon's engine write or read the file directly (see transfer.py), much
    faster than streaming; ``local_files=False`` (or $CKPTD_LOCAL_FILES=0)
    streams them anyway.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        insecure: bool = False,
        timeout: float | None = 30.0,
        local_files: bool | None = None,
    ) -> None:
        self.address: Address = parse_address(address or default_address())
        self.timeout = timeout
        if local_files is None:
            local_files = os.environ.get(LOCAL_FILES_ENV, "1") != "0"
        self.local_files = local_files and self.address.is_unix
        self._channel = open_channel(
            self.address, TlsFiles(tls_cert, tls_key, tls_ca), insecure=insecure
        )
        self._stub = api_pb2_grpc.CkptdStub(self._channel)
        # The image streams, with (de)serializers that skip protobuf objects
        # for the image bytes (see transfer.py); the same messages on the wire.
        service = f"/{api_pb2.DESCRIPTOR.services_by_name['Ckptd'].full_name}"
        self._checkpoint = self._channel.unary_stream(
            f"{service}/Checkpoint",
            request_serializer=api_pb2.CheckpointRequest.SerializeToString,
            response_deserializer=image_chunk_data)
        self._restart = self._channel.stream_unary(
            f"{service}/Restart", request_serializer=restart_request_bytes,
            response_deserializer=api_pb2.Container.FromString)

    # -- connection -----------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> bool:
        """Whether the daemon answers and reports itself SERVING.

        An unreachable daemon is simply not healthy (False); other failures,
        e.g. a daemon without the health service, raise.
        """
        stub = health_pb2_grpc.HealthStub(self._channel)
        for service in (HEALTH_SERVICE, ""):
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service),
                                   timeout=self.timeout)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                if code is grpc.StatusCode.NOT_FOUND and service:
                    continue  # the daemon may register only the overall status
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.NOT_FOUND):
                    return False
                raise self._error(e, self.timeout) from e
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        return False

    # -- lifecycle ------------------------------------------------------------

    def run(
        self,
        argv: Iterable[str],
        *,
        name: str = "",
        env: Iterable[str] | Mapping[str, str] = (),
        cwd: str = "",
        hostname: str = "",
        network: str = "host",
        tty: bool = False,
    ) -> Container:
        """Start ``argv`` as the init of a new container."""
        argv = builtins.list(argv)
        if not argv:
            raise InvalidArgument("no command to run")
        if network not in _NETWORKS:
            raise InvalidArgument(f"network must be 'host' or 'new', not {network!r}")
        try:
            request = api_pb2.RunRequest(
                argv=argv, name=name, env=_env_entries(env), cwd=cwd, hostname=hostname,
                network=_NETWORKS[network], tty=tty,
            )
        except ValueError as e:
            # protobuf strings must be UTF-8; a command line with other bytes
            # (surrogate-escaped by Python) cannot be sent.
            raise InvalidArgument(f"the command, environment and names must be UTF-8 text: {e}") from e
        return self._unary(self._stub.Run, request)

    def list(self, running_only: bool = False) -> builtins.list[Container]:
        """Every container the daemon knows (only running ones if asked)."""
        reply = self._unary(self._stub.List, api_pb2.ListRequest(running_only=running_only))
        return builtins.list(reply.containers)

    def status(self, ref: str = "") -> StatusResponse:
        """One container (by id or name) and its operations, or with no ``ref``
        the daemon itself and every running operation."""
        return self._unary(self._stub.Status, api_pb2.StatusRequest(id=ref))

    def operation(self, ref: str, kind: api_pb2.OperationKind) -> Operation | None:
        """The running operation of ``kind`` on container ``ref``, if there is one."""
        for op in self.status(ref).operations:
            if op.kind == kind:
                return op
        return None

    def freeze(self, ref: str, timeout: float = DEFAULT_STATE_TIMEOUT) -> Container:
        """Freeze every task of the container; returns once the cgroup is frozen."""
        request = api_pb2.FreezeRequest(id=_required(ref), timeout_seconds=timeout)
        return self._unary(self._stub.Freeze, request, waits=timeout)

    def thaw(self, ref: str, timeout: float = DEFAULT_STATE_TIMEOUT) -> Container:
        """Thaw a frozen container; returns once the cgroup is thawed."""
        request = api_pb2.ThawRequest(id=_required(ref), timeout_seconds=timeout)
        return self._unary(self._stub.Thaw, request, waits=timeout)

    def kill(self, ref: str, signal: int = 0, timeout: float = 0.0) -> Container:
        """Send ``signal`` (0: SIGTERM) to the init; with ``timeout`` > 0, SIGKILL
        the whole container if it has not exited by then."""
        request = api_pb2.KillRequest(id=_required(ref), signal=signal, timeout_seconds=timeout)
        return self._unary(self._stub.Kill, request, waits=timeout)

    def delete(self, ref: str, force: bool = False) -> str:
        """Forget an exited container (``force``: SIGKILL it first); returns its id."""
        request = api_pb2.DeleteRequest(id=_required(ref), force=force)
        return self._unary(self._stub.Delete, request).id

    def logs(self, ref: str, follow: bool = False) -> Generator[bytes, None, None]:
        """The container's output, as it comes; ``follow`` waits for more until
        it exits. Closing the iterator ends the call."""
        request = api_pb2.LogsRequest(id=_required(ref), follow=follow)
        return self._data_stream(self._stub.Logs, request, data=lambda m: m.data)

    # -- checkpoint / restart -------------------------------------------------

    def checkpoint(
        self, ref: str | None = None, *, pid: int | None = None, leave_running: bool = False,
        external: Sequence[str] = (), before_ack: Callable[[], None] | None = None,
    ) -> Generator[bytes, None, None]:
        """Checkpoint container ``ref`` or host process tree ``pid``, yielding the
        image as the daemon produces it. Closing the iterator early cancels the
        checkpoint (the daemon then leaves the target running). Unless
        ``leave_running``, the target is killed only once the consumer has
        taken every chunk and asked for more: then ``before_ack`` (make what
        was written durable) runs and the daemon is told it may kill; if
        it raises, the target is resumed instead. ``external``: names of
        resources shared with processes outside the tree to accept as
        private copies, as a refused checkpoint's message lists them."""
        request = _checkpoint_request(ref, pid, leave_running, external)
        return _as_bytes(self._checkpoint_stream(request, before_ack))

    def checkpoint_to_file(
        self,
        dest: PathOrFile,
        *,
        ref: str | None = None,
        pid: int | None = None,
        leave_running: bool = False,
        progress: ProgressFn | None = None,
        external: Sequence[str] = (),
    ) -> int:
        """Checkpoint into ``dest`` (a path, or a binary file left open); returns
        the image size. A path gets the image only if all of it arrived; it
        is in place, fsynced, before the target is killed. ``external`` as
        for ``checkpoint``."""
        request = _checkpoint_request(ref, pid, leave_running, external)
        if not is_path(dest):
            f = dest  # type: ignore[assignment]
            total = self._checkpoint_into(f, request, progress,  # type: ignore[arg-type]
                                          lambda: make_durable(f))  # type: ignore[arg-type]
            _check_not_empty(total)
            return total
        with atomic_output(dest) as out:  # type: ignore[arg-type]
            total = self._checkpoint_into(out.file, request, progress, out.commit)
            _check_not_empty(total)  # inside: an empty image is not kept either
        return total

    def _checkpoint_into(self, f: BinaryIO, request: api_pb2.CheckpointRequest,
                         progress: ProgressFn | None, before_ack: Callable[[], object]) -> int:
        fd = self._hand_over(f, IMAGE_OUT, request)
        if fd is not None:
            start = file_offset(fd)
            self._await_local_checkpoint(request, fd, start, _offset_progress(fd, start, progress),
                                         before_ack)
            return _report(progress, file_offset(fd) - start)
        # The chunks as views of what gRPC received: written out without a copy.
        stream = self._checkpoint_stream(request, lambda: (f.flush(), before_ack()))
        # closing(): if writing fails (disk full, broken pipe), cancel the call
        # at once so that the daemon abandons the checkpoint.
        with contextlib.closing(stream):
            return write_chunks(counted(stream, progress), f)

    def _checkpoint_stream(self, request: api_pb2.CheckpointRequest,
                           before_ack: Callable[[], object] | None
                           ) -> Generator[Any, None, None]:
        call = self._checkpoint(request)
        received = 0
        complete = False
        try:
            for message in call:
                if isinstance(message, api_pb2.ImageComplete):
                    _check_complete(message, received)
                    complete = True
                    if message.confirm_token:
                        # Everything yielded has been consumed: the caller
                        # asked for more. Durable first, then the kill.
                        if before_ack is not None:
                            before_ack()
                        self._confirm(message)
                    continue
                received += len(message)
                yield message
            if not complete:
                raise Internal("ckptd ended the checkpoint without saying the image was complete")
        except grpc.RpcError as e:
            raise self._error(e, None) from e
        finally:
            # The consumer stopped early (or we failed): tell the daemon, so it
            # stops producing and resumes the target.
            call.cancel()

    def _confirm(self, complete: api_pb2.ImageComplete) -> None:
        """Tell the daemon we hold the whole image: it may kill the tree."""
        self._stub.ConfirmCheckpoint(
            api_pb2.CheckpointConfirmation(token=complete.confirm_token, bytes=complete.bytes),
            timeout=self.timeout)

    def _await_local_checkpoint(self, request: api_pb2.CheckpointRequest, fd: int, start: int,
                                poll: Callable[[], None] | None,
                                before_ack: Callable[[], object]) -> None:
        """Wait for a checkpoint into the local file ``fd`` (the engine writes
        it; the call carries only the Complete message), calling ``poll``
        meanwhile; then make the file durable and confirm. Ctrl-C or an
        error cancels the call, so that the daemon resumes the target."""
        call = self._checkpoint(request)
        got: queue.Queue[Any] = queue.Queue()
        _END = object()

        def read() -> None:
            try:
                for message in call:
                    got.put(message)
                got.put(_END)
            except grpc.RpcError as e:
                got.put(e)

        threading.Thread(target=read, name="ckptctl-checkpoint", daemon=True).start()
        complete = False
        try:
            while True:
                try:
                    message = got.get(timeout=LOCAL_PROGRESS_SECONDS)
                except queue.Empty:
                    if poll is not None:
                        poll()
                    continue
                if message is _END:
                    break
                if isinstance(message, grpc.RpcError):
                    raise self._error(message, None) from message
                if not isinstance(message, api_pb2.ImageComplete):
                    raise Internal("ckptd streamed an image although it had the file to write")
                _check_complete(message, file_offset(fd) - start)
                complete = True
                if message.confirm_token:
                    before_ack()
                    self._confirm(message)
            if not complete:
                raise Internal("ckptd ended the checkpoint without saying the image was complete")
        except grpc.RpcError as e:
            raise self._error(e, None) from e
        finally:
            call.cancel()   # nothing left to cancel when it ended well

    def restart(self, chunks: Iterable[bytes], *, name: str = "") -> Container:
        """Restart a container from the image bytes in ``chunks``."""
        options = api_pb2.RestartOptions(name=name)
        failure: builtins.list[BaseException] = []
        holder: builtins.list[grpc.Future] = []
        started = threading.Event()

        def requests() -> Iterator[api_pb2.RestartRequest | bytes]:
            yield api_pb2.RestartRequest(options=options)
            try:
                for chunk in rechunk(chunks):
                    yield restart_data(chunk)   # a serialized RestartRequest
            except Exception as e:  # noqa: BLE001 - re-raised on the caller's thread
                # grpc reads this iterator on its own thread and would only log
                # the error; cancel the call so the daemon never sees a clean
                # end of a truncated image, and hand the error to the caller.
                # (Not BaseException: GeneratorExit is grpc dropping the iterator.)
                failure.append(e)
                started.wait()
                holder[0].cancel()

        future = self._restart.future(requests())
        holder.append(future)
        started.set()
        try:
            return self._wait(future, failure)
        except grpc.RpcError as e:
            if failure:
                raise failure[0] from None
            raise self._error(e, None) from e

    def restart_from_file(
        self, source: PathOrFile, *, name: str = "", progress: ProgressFn | None = None
    ) -> Container:
        """Restart a container from an image file (a path, or a binary file)."""
        if not is_path(source):
            return self._restart_from(source, name, progress)  # type: ignore[arg-type]
        with open(source, "rb") as f:  # type: ignore[arg-type]
            return self._restart_from(cast(BinaryIO, f), name, progress)

    def _restart_from(self, f: BinaryIO, name: str, progress: ProgressFn | None) -> Container:
        options = api_pb2.RestartOptions(name=name)
        fd = self._hand_over(f, IMAGE_IN, options)
        if fd is None:
            return self.restart(counted(read_chunks(f), progress), name=name)
        start = file_offset(fd)
        future = self._restart.future(iter([api_pb2.RestartRequest(options=options)]))
        try:
            container = self._wait(future, [], poll=_offset_progress(fd, start, progress),
                                   every=LOCAL_PROGRESS_SECONDS)
        except grpc.RpcError as e:
            raise self._error(e, None) from e
        _report(progress, file_offset(fd) - start)
        return container

    def _hand_over(self, f: BinaryIO, mode: bytes,
                   message: api_pb2.CheckpointRequest | api_pb2.RestartOptions) -> int | None:
        """Hand ``f`` to the daemon if it can use it, putting the token into
        ``message``; its descriptor then, else None (stream the image)."""
        fd = regular_fd(f) if self.local_files else None
        if fd is None:
            return None
        if mode == IMAGE_OUT:
            f.flush()   # what we buffered goes first
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
                os.lseek(fd, 0, os.SEEK_END)   # where the image will start
        else:
            os.lseek(fd, f.tell(), os.SEEK_SET)   # what f read ahead is the engine's to read
        assert self.address.unix_path is not None
        try:
            token = hand_over(os.path.abspath(self.address.unix_path), fd, mode)
        except ValueError as e:
            raise InvalidArgument(f"ckptd refused the image file: {e}") from None
        if token is None:
            return None
        if isinstance(message, api_pb2.CheckpointRequest):
            message.local_output_token = token
        else:
            message.local_input_token = token
        return fd

    def migrate(
        self,
        ref: str,
        destination: str,
        *,
        leave_running: bool = False,
        progress: Callable[[Operation], None] | None = None,
    ) -> Container:
        """Checkpoint ``ref`` here and restart it on the daemon at ``destination``.

        Over TCP the source daemon authenticates to the destination with the
        client certificate of its own configuration. ``progress``, if
        given, is called about every second with the migrate operation as the
        daemon reports it. Returns the container on the destination.
        """
        parse_address(destination)  # only to refuse a malformed one before the daemon does
        request = api_pb2.MigrateRequest(
            id=_required(ref), destination=destination, leave_running=leave_running,
        )
        future = self._stub.Migrate.future(request)
        watch = None if progress is None else lambda: self._report_migrate(ref, progress)
        try:
            reply = self._wait(future, [], poll=watch)
        except grpc.RpcError as e:
            raise self._error(e, None) from e
        return reply.container

    # -- plumbing -------------------------------------------------------------

    def _deadline(self, waits: float = 0.0) -> float | None:
        if self.timeout is None or self.timeout <= 0:
            return None
        return self.timeout + max(waits, 0.0)

    def _error(self, error: grpc.RpcError, timeout: float | None) -> ClientError:
        return from_rpc_error(error, self.address.text, timeout)

    def _unary(self, method: Any, request: Any, *, waits: float = 0.0) -> Any:
        deadline = self._deadline(waits)
        try:
            return method(request, timeout=deadline)
        except grpc.RpcError as e:
            raise self._error(e, deadline) from e

    def _data_stream(self, method: Any, request: Any,
                     data: Callable[[Any], Any] | None) -> Generator[Any, None, None]:
        """``data(message)`` of each message of a server stream (the message
        itself if ``data`` is None)."""
        call = method(request)
        try:
            for message in call:
                yield message if data is None else data(message)
        except grpc.RpcError as e:
            raise self._error(e, None) from e
        finally:
            # The consumer stopped early (or we failed): tell the daemon, so it
            # stops producing and, for a checkpoint, resumes the target.
            call.cancel()

    def _wait(
        self,
        future: grpc.Future,
        failure: builtins.list[BaseException],
        poll: Callable[[], None] | None = None,
        every: float | None = None,
    ) -> Any:
        """The result of ``future``; Ctrl-C cancels the call instead of leaving it running."""
        try:
            while True:
                try:
                    return future.result(timeout=every or POLL_SECONDS)
                except grpc.FutureTimeoutError:
                    if poll is not None:
                        poll()
                except grpc.FutureCancelledError:
                    if failure:
                        raise failure[0] from None
                    raise
        except BaseException:
            future.cancel()
            raise

    def _report_migrate(self, ref: str, progress: Callable[[Operation], None]) -> None:
        try:
            op = self.operation(ref, api_pb2.OPERATION_KIND_MIGRATE)
        except ClientError:
            return  # progress is cosmetic: the Migrate call reports real failures
        if op is not None:
            progress(op)


def _as_bytes(chunks: Generator[Any, None, None]) -> Generator[bytes, None, None]:
    """Each chunk as bytes of its own (gRPC's are views); closing this closes ``chunks``."""
    with contextlib.closing(chunks):
        for chunk in chunks:
            yield bytes(chunk)


def _check_complete(message: api_pb2.ImageComplete, received: int) -> None:
    if message.bytes != received:
        raise Internal(f"ckptd said the image was {message.bytes} bytes long, but "
                       f"{received} arrived")


def _checkpoint_request(ref: str | None, pid: int | None, leave_running: bool,
                        external: Sequence[str] = ()) -> api_pb2.CheckpointRequest:
    if (ref is None) == (pid is None):
        raise InvalidArgument("checkpoint needs exactly one of a container and a pid")
    if isinstance(external, str):
        raise InvalidArgument("external is a list of names, not one string")
    external = list(external)
    if ref is not None:
        return api_pb2.CheckpointRequest(id=_required(ref), leave_running=leave_running,
                                         external=external)
    if pid is None or pid <= 0:
        raise InvalidArgument(f"bad pid {pid}")
    return api_pb2.CheckpointRequest(pid=pid, leave_running=leave_running, external=external)


def _required(ref: str) -> str:
    if not ref:
        raise InvalidArgument("no container id or name given")
    return ref


def _env_entries(env: Iterable[str] | Mapping[str, str]) -> builtins.list[str]:
    if isinstance(env, Mapping):
        return [f"{k}={v}" for k, v in env.items()]
    entries = builtins.list(env)
    for entry in entries:
        if "=" not in entry or entry.startswith("="):
            raise InvalidArgument(f"environment entry {entry!r} is not KEY=VALUE")
    return entries


def _offset_progress(fd: int, start: int,
                     progress: ProgressFn | None) -> Callable[[], None] | None:
    """Progress of the engine in a file we share the offset of."""
    if progress is None:
        return None
    return lambda: progress(file_offset(fd) - start)


def _report(progress: ProgressFn | None, done: int) -> int:
    if progress is not None:
        progress(done)
    return done


def _check_not_empty(total: int) -> None:
    if total == 0:
        # A valid image has at least a header and a trailer; an empty stream
        # means the daemon gave up without saying why.
        raise Internal("ckptd sent an empty checkpoint image")


__all__ = ["Client", "Container", "Operation", "StatusResponse", "HEALTH_SERVICE"]
