"""Long-running operations (checkpoint, restart, freeze ...) and their progress.

An operation is registered while it runs so that ``Status`` can report what it
is doing (its phase) and how many bytes it has moved. The engine updates the
live ``Operation``; readers get immutable snapshots.
"""

from __future__ import annotations

import contextlib
import enum
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


class Kind(enum.Enum):
    CHECKPOINT = "checkpoint"
    RESTART = "restart"
    MIGRATE = "migrate"
    FREEZE = "freeze"
    THAW = "thaw"


@dataclass(frozen=True)
class OperationInfo:
    id: str
    kind: Kind
    container_id: str
    phase: str
    bytes_done: int
    bytes_total: int
    started_at: float


@dataclass
class Operation:
    """A running operation; ``update`` may be called from any thread."""

    kind: Kind
    container_id: str
    id: str = field(default_factory=lambda: secrets.token_hex(6))
    phase: str = "starting"
    bytes_done: int = 0
    bytes_total: int = 0
    started_at: float = field(default_factory=time.time)

    def update(self, *, phase: str | None = None, bytes_done: int | None = None,
               bytes_total: int | None = None) -> None:
        # Plain attribute stores are atomic under the GIL; readers take a
        # snapshot, so no lock is needed for progress updates.
        if phase is not None:
            self.phase = phase
        if bytes_done is not None:
            self.bytes_done = bytes_done
        if bytes_total is not None:
            self.bytes_total = bytes_total

    def snapshot(self) -> OperationInfo:
        return OperationInfo(self.id, self.kind, self.container_id, self.phase,
                             self.bytes_done, self.bytes_total, self.started_at)


class Operations:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, Operation] = {}

    @contextlib.contextmanager
    def track(self, kind: Kind, container_id: str) -> Iterator[Operation]:
        op = Operation(kind, container_id)
        with self._lock:
            self._running[op.id] = op
        try:
            yield op
        finally:
            with self._lock:
                del self._running[op.id]

    def list(self, container_id: str | None = None) -> list[OperationInfo]:
        with self._lock:
            ops = list(self._running.values())
        return [op.snapshot() for op in ops
                if container_id is None or op.container_id == container_id]
