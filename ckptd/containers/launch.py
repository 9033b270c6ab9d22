"""The daemon's side of the shim: start one, hear whether the init started.

``start_shim`` returns once the init has exec'd (or raises after reaping the
shim if it did not). Reaping a shim that started is the ShimReaper's job.
Starting Python and importing the shim costs ~65 ms, most of a container's
start, so ``ShimPool`` keeps shims started ahead, blocked reading their
config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.containers.children import python_argv, python_env
from ckptd.containers.shim import ShimConfig
from ckptd.containers.spares import Spares
from ckptd.errors import SystemError_, TimeoutError_, UsageError
from ckptd.kernel import process

SHIM_MODULE = "ckptd.containers.shim"
# Python start-up, fork and exec take ~50 ms here; allow for a loaded machine.
SHIM_REPORT_TIMEOUT = 10.0
# A shim that reported an init failure exits right after; do not wait forever.
SHIM_EXIT_TIMEOUT = 5.0
SHIM_LOG_TAIL = 2000   # bytes of shim.log quoted when a shim dies unexpectedly


@dataclass(frozen=True)
class Started:
    shim: subprocess.Popen[bytes]
    shim_start_time: int
    init_pid: int
    init_start_time: int


def spawn_shim(module: str = SHIM_MODULE) -> subprocess.Popen[bytes]:
    """A shim process, waiting for its config on stdin. Its stderr is ours
    until it reads the config, which names the container's shim log."""
    try:
        return subprocess.Popen(
            python_argv(module), env=python_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            close_fds=True, start_new_session=True, cwd="/",
        )
    except OSError as e:
        raise SystemError_(f"cannot start the container shim: {e}") from e


# Two: a restart right after a run (or two runs) must not wait for a cold start.
SPARE_SHIMS = 2


class ShimPool:
    """Hands out shims, keeping some started ahead of need."""

    def __init__(self, module: str = SHIM_MODULE, count: int = SPARE_SHIMS) -> None:
        self._spares: Spares[subprocess.Popen[bytes]] = Spares(
            "shim", count, lambda: spawn_shim(module), lambda p: p.poll() is None, _discard,
            pid=lambda p: p.pid)

    def take(self) -> subprocess.Popen[bytes]:
        return self._spares.take()

    def close(self) -> None:
        self._spares.close()


def _discard(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def start_shim(cfg: ShimConfig, shim_log: Path, pool: ShimPool | None = None,
               timeout: float = SHIM_REPORT_TIMEOUT) -> Started:
    """Start the shim for ``cfg``. UsageError if the command could not be
    started for a reason the caller can fix, SystemError_/TimeoutError_ else."""
    proc = pool.take() if pool is not None else spawn_shim()
    assert proc.stdin is not None and proc.stdout is not None
    cfg = dataclasses.replace(cfg, shim_log=str(shim_log))
    try:
        # Our child, not yet reaped: its pid cannot have been reused.
        shim_start_time = process.start_time(proc.pid)
        try:
            proc.stdin.write(cfg.to_json().encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; the missing report below says so, with its log
        line = _read_line(proc.stdout.fileno(), timeout)
        report = _parse_report(line, shim_log)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    if "error" in report:
        proc.wait(SHIM_EXIT_TIMEOUT)
        if report.get("kind") == "usage":
            raise UsageError(report["error"])
        raise SystemError_(report["error"])
    return Started(shim=proc, shim_start_time=shim_start_time,
                   init_pid=int(report["init_pid"]),
                   init_start_time=int(report["init_start_time"]))


def _read_line(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError_(f"the container shim did not report within {timeout:g} s")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def _parse_report(line: bytes, shim_log: Path) -> dict[str, Any]:
    if not line.strip():
        raise SystemError_(f"the container shim died before reporting: {_tail(shim_log)}")
    try:
        report = json.loads(line)
    except ValueError as e:
        raise SystemError_(f"the container shim sent a bad report: {line[:200]!r}") from e
    if not isinstance(report, dict):
        raise SystemError_(f"the container shim sent a bad report: {line[:200]!r}")
    return report


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - SHIM_LOG_TAIL))
            text = f.read().decode(errors="replace").strip()
    except OSError:
        return "(no shim log)"
    return text.splitlines()[-1] if text else "(shim log empty)"
