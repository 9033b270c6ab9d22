"""What each ckptctl subcommand does, on top of ``Client``.

A handler takes the ``Context`` (parsed arguments, streams, a lazily made
client) and returns an exit code; failures are raised (``ClientError`` from
the library, ``CommandError`` from here) and turned into one line on stderr
by ``cli.main``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TextIO

from ckptd.v1 import api_pb2

from . import exitcodes, render
from .client import Client
from .progress import TransferProgress


class CommandError(Exception):
    """A failure found on this side (bad flags, unreadable file, bad image)."""

    def __init__(self, message: str, exit_code: int = exitcodes.FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def usage_error(message: str) -> CommandError:
    return CommandError(message, exitcodes.USAGE)


@dataclass
class Context:
    """Everything a handler needs; streams are injectable for tests."""

    args: argparse.Namespace
    stdout: TextIO
    stderr: TextIO
    stdin: TextIO
    _client: Client | None = field(default=None, repr=False)

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    def client(self) -> Client:
        """The client, made on first use: `image inspect` needs no daemon."""
        if self._client is None:
            a = self.args
            self._client = Client(
                a.address, tls_cert=a.tls_cert, tls_key=a.tls_key, tls_ca=a.tls_ca,
                insecure=a.insecure, timeout=a.timeout if a.timeout and a.timeout > 0 else None,
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def print(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def print_json(self, value: Any) -> None:
        self.print(render.to_json(value))

    def binary_stdout(self) -> BinaryIO:
        self.stdout.flush()  # text written so far goes first
        return self.stdout.buffer

    def progress(self, label: str, **kwargs: Any) -> TransferProgress | None:
        """A progress display on stderr, only for a person watching a terminal."""
        if self.json or not _isatty(self.stderr):
            return None
        return TransferProgress(self.stderr, label, **kwargs)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _emit_container(ctx: Context, c: api_pb2.Container) -> int:
    if ctx.json:
        ctx.print_json(c)
    else:
        ctx.print(c.id)
    return exitcodes.OK


# -- lifecycle -------------------------------------------------------------------

def cmd_run(ctx: Context) -> int:
    a = ctx.args
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        raise usage_error("run needs a command: ckptctl run [OPTIONS] [--] CMD [ARGS...]")
    c = ctx.client().run(command, name=a.name, env=a.env, cwd=a.cwd, hostname=a.hostname,
                         network=a.net, tty=a.tty)
    return _emit_container(ctx, c)


def cmd_ps(ctx: Context) -> int:
    containers = ctx.client().list(running_only=not ctx.args.all)
    if ctx.json:
        ctx.print_json(containers)
    else:
        ctx.print(render.ps_table(containers))
    return exitcodes.OK


def cmd_status(ctx: Context) -> int:
    reply = ctx.client().status(ctx.args.id or "")
    ctx.print(render.to_json(reply) if ctx.json else render.status_text(reply))
    return exitcodes.OK


def cmd_freeze(ctx: Context) -> int:
    return _emit_container(ctx, ctx.client().freeze(ctx.args.id, timeout=ctx.args.op_timeout))


def cmd_thaw(ctx: Context) -> int:
    return _emit_container(ctx, ctx.client().thaw(ctx.args.id, timeout=ctx.args.op_timeout))


def cmd_kill(ctx: Context) -> int:
    a = ctx.args
    return _emit_container(ctx, ctx.client().kill(a.id, signal=a.signal, timeout=a.op_timeout))


def cmd_rm(ctx: Context) -> int:
    deleted = ctx.client().delete(ctx.args.id, force=ctx.args.force)
    ctx.print(render.to_json({"id": deleted}) if ctx.json else deleted)
    return exitcodes.OK


def cmd_logs(ctx: Context) -> int:
    out = ctx.binary_stdout()
    for chunk in ctx.client().logs(ctx.args.id, follow=ctx.args.follow):
        out.write(chunk)
        out.flush()  # a follower wants each line as it comes
    return exitcodes.OK


# -- checkpoint / restart ------------------------------------------------------------

def cmd_checkpoint(ctx: Context) -> int:
    a = ctx.args
    if (a.id is None) == (a.pid is None):
        raise usage_error("give either a container ID or --pid PID")
    to_stdout = a.output == "-"
    if to_stdout and _isatty(ctx.stdout):
        raise usage_error("refusing to write an image to a terminal: redirect stdout or use -o FILE")
    client = ctx.client()
    total_source = _checkpoint_total(client, a.id) if a.id else None
    progress = ctx.progress("checkpoint", total_source=total_source)
    try:
        dest = ctx.binary_stdout() if to_stdout else a.output
        size = client.checkpoint_to_file(dest, ref=a.id, pid=a.pid,
                                         leave_running=a.leave_running, progress=progress,
                                         external=a.external)
    except BrokenPipeError:
        raise
    except OSError as e:
        raise CommandError(f"cannot write {a.output}: {e.strerror or e}") from e
    finally:
        if progress is not None:
            progress.finish()
    if ctx.json and not to_stdout:
        ctx.print_json({"file": a.output, "bytes": size})
    return exitcodes.OK


def _checkpoint_total(client: Client, ref: str) -> Callable[[], int | None]:
    def total() -> int | None:
        op = client.operation(ref, api_pb2.OPERATION_KIND_CHECKPOINT)
        return op.bytes_total if op is not None else None
    return total


def cmd_restart(ctx: Context) -> int:
    a = ctx.args
    client = ctx.client()
    try:
        with _open_input(ctx, a.input) as source:
            progress = ctx.progress("restart", total=_size_of(source))
            try:
                c = client.restart_from_file(source, name=a.name, progress=progress)
            finally:
                if progress is not None:
                    progress.finish()
    except OSError as e:
        raise CommandError(f"cannot read {_shown(a.input)}: {e.strerror or e}") from e
    return _emit_container(ctx, c)


def cmd_migrate(ctx: Context) -> int:
    a = ctx.args
    progress = ctx.progress("migrate")
    try:
        c = ctx.client().migrate(
            a.id, a.to, leave_running=a.leave_running,
            progress=progress.show_operation if progress is not None else None,
        )
    finally:
        if progress is not None:
            progress.finish()
    return _emit_container(ctx, c)


def cmd_image_inspect(ctx: Context) -> int:
    a = ctx.args
    try:
        # Imported here: decoding images is the image package's business and
        # every other command should start without loading it.
        from ckptd.image.inspect import inspect_image, summarize
    except ImportError as e:
        raise CommandError(f"image inspection is not available in this installation ({e})") from e
    from ckptd.errors import ImageError

    try:
        with _open_input(ctx, a.file) as source:
            result = inspect_image(source)
    except ImageError as e:
        raise CommandError(f"{_shown(a.file)}: {e}", exitcodes.BAD_IMAGE) from e
    except OSError as e:
        raise CommandError(f"cannot read {_shown(a.file)}: {e.strerror or e}") from e
    ctx.print(json.dumps(result, indent=2) if ctx.json else summarize(result))
    return exitcodes.OK


# -- files ---------------------------------------------------------------------------

@contextlib.contextmanager
def _open_input(ctx: Context, path: str) -> Iterator[BinaryIO]:
    """``path`` opened for reading, or stdin for "-" (which stays open)."""
    if path != "-":
        with open(path, "rb") as f:
            yield f
        return
    if _isatty(ctx.stdin):
        raise usage_error("refusing to read an image from a terminal: redirect stdin")
    yield ctx.stdin.buffer


def _size_of(f: BinaryIO) -> int | None:
    """The size of a regular file (for a percentage); None for a pipe."""
    try:
        st = os.fstat(f.fileno())
    except (OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) and st.st_size else None


def _shown(path: str) -> str:
    return "<stdin>" if path == "-" else path
