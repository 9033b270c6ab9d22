"""Turning API messages into what ckptctl prints: tables, key: value lines, JSON.

Pure functions of the messages (and of ``now`` for ages), so that tests can
check the output without a daemon.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from ckptd.v1 import api_pb2

from .signals import signal_name

# A long command line would push the table past any terminal; the full one is
# in `ckptctl status ID` and in --json.
COMMAND_WIDTH = 40

_STATES = {
    api_pb2.CONTAINER_STATE_RUNNING: "running",
    api_pb2.CONTAINER_STATE_FROZEN: "frozen",
    api_pb2.CONTAINER_STATE_LOST: "lost",
}

_NETWORKS = {
    api_pb2.NETWORK_MODE_UNSPECIFIED: "host",
    api_pb2.NETWORK_MODE_HOST: "host",
    api_pb2.NETWORK_MODE_NEW: "new",
}

_OPERATIONS = {
    api_pb2.OPERATION_KIND_CHECKPOINT: "checkpoint",
    api_pb2.OPERATION_KIND_RESTART: "restart",
    api_pb2.OPERATION_KIND_MIGRATE: "migrate",
    api_pb2.OPERATION_KIND_FREEZE: "freeze",
    api_pb2.OPERATION_KIND_THAW: "thaw",
}


# -- JSON ----------------------------------------------------------------------

def to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready dict: proto field names, every field present."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def to_json(value: Any) -> str:
    if isinstance(value, Message):
        value = to_dict(value)
    elif isinstance(value, list):
        value = [to_dict(v) if isinstance(v, Message) else v for v in value]
    return json.dumps(value, indent=2, sort_keys=False)


# -- small values --------------------------------------------------------------

def state_text(c: api_pb2.Container) -> str:
    """running, frozen, exited(CODE), killed(SIGNAME), lost."""
    if c.state == api_pb2.CONTAINER_STATE_EXITED:
        if c.exit_signal:
            return f"killed({signal_name(c.exit_signal)})"
        return f"exited({c.exit_code})"
    return _STATES.get(c.state, "unknown")


def human_bytes(n: int) -> str:
    """1536 -> '1.5K'; binary units, as ps and free print them."""
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            if unit == "B":
                return f"{int(value)}B"
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """Coarse, like ps: 42s, 5m, 3h, 2d."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _seconds(ts: Timestamp) -> float | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.seconds + ts.nanos / 1e9


def when(ts: Timestamp, now: float | None = None) -> str:
    """'2024-05-01 12:00:03 (5m ago)', or '-' for an unset time."""
    t = _seconds(ts)
    if t is None:
        return "-"
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    return f"{stamp} ({human_duration(now - t)} ago)"


def command_text(argv: Iterable[str], width: int | None = None) -> str:
    text = shlex.join(list(argv))
    if width is not None:
        # One table row per container, whatever the command's quoted newlines.
        text = " ".join(text.split())
    if width is not None and len(text) > width:
        text = text[: width - 3] + "..."
    return text


def progress_text(op: api_pb2.Operation) -> str:
    """'12M', or '12M of 100M (12%)' when the total is known."""
    if op.bytes_total:
        pct = 100.0 * op.bytes_done / op.bytes_total
        return f"{human_bytes(op.bytes_done)} of {human_bytes(op.bytes_total)} ({pct:.0f}%)"
    return human_bytes(op.bytes_done)


def operation_kind(op: api_pb2.Operation) -> str:
    return _OPERATIONS.get(op.kind, "unknown")


# -- tables and details ----------------------------------------------------------

def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    rows = [list(headers)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    lines = []
    for r in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(r[:-1])] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


PS_HEADERS = ("ID", "NAME", "STATE", "PID", "TASKS", "RSS", "AGE", "COMMAND")


def ps_table(containers: Iterable[api_pb2.Container], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = []
    for c in containers:
        started = _seconds(c.started_at)
        running = c.state in (api_pb2.CONTAINER_STATE_RUNNING, api_pb2.CONTAINER_STATE_FROZEN)
        rows.append((
            c.id,
            c.name or "-",
            state_text(c),
            str(c.init_pid) if c.init_pid and running else "-",
            str(c.num_tasks) if running else "-",
            human_bytes(c.rss_bytes) if running else "-",
            human_duration(now - started) if started is not None else "-",
            command_text(c.argv, COMMAND_WIDTH),
        ))
    return table(PS_HEADERS, rows)


def _key_values(pairs: Iterable[tuple[str, str]]) -> list[str]:
    pairs = list(pairs)
    width = max((len(k) for k, _ in pairs), default=0) + 1
    return [f"{(k + ':').ljust(width)} {v}".rstrip() for k, v in pairs]


def container_details(c: api_pb2.Container, now: float | None = None) -> list[str]:
    pairs = [
        ("ID", c.id),
        ("Name", c.name or "-"),
        ("State", state_text(c)),
        ("PID", f"{c.init_pid} (in container: {c.init_ns_pid})" if c.init_pid else "-"),
        ("Tasks", str(c.num_tasks)),
        ("RSS", human_bytes(c.rss_bytes)),
        ("Started", when(c.started_at, now)),
    ]
    if c.state == api_pb2.CONTAINER_STATE_EXITED:
        pairs.append(("Exited", when(c.exited_at, now)))
    pairs += [
        ("Command", command_text(c.argv)),
        ("Hostname", c.hostname or "-"),
        ("Network", _NETWORKS.get(c.network, "unknown")),
        ("TTY", "yes" if c.tty else "no"),
        ("Cgroup", c.cgroup_path or "-"),
    ]
    pairs += [("Note", note) for note in c.notes]
    return _key_values(pairs)


def daemon_details(d: api_pb2.DaemonInfo, now: float | None = None) -> list[str]:
    return _key_values([
        ("Version", d.version or "-"),
        ("PID", str(d.pid) if d.pid else "-"),
        ("Started", when(d.started_at, now)),
        ("Freezer", d.freezer_backend or "-"),
        ("Cgroup root", d.cgroup_root or "-"),
        ("State dir", d.state_dir or "-"),
    ])


def operations_lines(ops: Sequence[api_pb2.Operation], now: float | None = None,
                     with_container: bool = True) -> list[str]:
    if not ops:
        return ["Operations: none"]
    now = time.time() if now is None else now
    headers = ["ID", "KIND"] + (["CONTAINER"] if with_container else []) + [
        "PHASE", "PROGRESS", "AGE"]
    rows = []
    for op in ops:
        started = _seconds(op.started_at)
        rows.append([op.id, operation_kind(op)]
                    + ([op.container_id or "-"] if with_container else [])
                    + [op.phase or "-", progress_text(op),
                       human_duration(now - started) if started is not None else "-"])
    body = table(headers, rows).splitlines()
    return ["Operations:"] + ["  " + line for line in body]


def status_text(reply: api_pb2.StatusResponse, now: float | None = None) -> str:
    """Details of the container asked for, or of the daemon, then the operations."""
    if reply.HasField("container"):
        lines = container_details(reply.container, now)
        lines += operations_lines(reply.operations, now, with_container=False)
    else:
        lines = daemon_details(reply.daemon, now)
        lines += operations_lines(reply.operations, now)
    return "\n".join(lines)
