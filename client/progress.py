"""A one-line progress display on a terminal for image transfers.

Only ever drawn on a tty (the CLI decides): redrawn in place with a carriage
return, at most a few times a second so that a fast transfer does not spend
its time printing.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import TextIO

from ckptd.v1 import api_pb2

from .render import human_bytes, progress_text

# Redraw at most this often: smooth to the eye, negligible cost.
REDRAW_SECONDS = 0.1
# Ask for the expected total at most this often (it costs a Status call).
TOTAL_POLL_SECONDS = 1.0
BAR_WIDTH = 20


def transfer_line(label: str, done: int, elapsed: float, total: int | None) -> str:
    """'checkpoint [#####     ] 25%  25M of 100M  12M/s' (no bar when total is unknown)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [label]
    if total:
        fraction = min(done / total, 1.0)
        filled = int(fraction * BAR_WIDTH)
        parts.append(f"[{'#' * filled}{' ' * (BAR_WIDTH - filled)}] {fraction * 100:3.0f}%")
        parts.append(f"{human_bytes(done)} of {human_bytes(total)}")
    else:
        parts.append(human_bytes(done))
    parts.append(f"{human_bytes(int(rate))}/s")
    return "  ".join(parts)


class TransferProgress:
    """A ``ProgressFn`` (called with bytes done so far) that draws on ``stream``.

    ``total`` is the expected size if known up front (a file being restarted);
    ``total_source`` is asked now and then when it is not (a checkpoint, whose
    size the daemon may report through Status).
    """

    def __init__(
        self,
        stream: TextIO,
        label: str,
        *,
        total: int | None = None,
        total_source: Callable[[], int | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.label = label
        self.total = total
        self.total_source = total_source
        self.clock = clock
        self.started = clock()
        self.done = 0
        self._last_draw = float("-inf")
        self._last_poll = float("-inf")
        self._drawn = False

    def __call__(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if now - self._last_draw >= REDRAW_SECONDS:
            self._poll_total(now)
            self._draw(now)

    def show_operation(self, op: api_pb2.Operation) -> None:
        """Draw what the daemon says about a running operation (for migrate)."""
        phase = op.phase or "working"
        self._write(f"{self.label}: {phase}  {progress_text(op)}")

    def finish(self) -> None:
        """Draw the final state and end the line (if anything was drawn)."""
        if self._drawn:
            if self.done:  # not for migrate, which shows the daemon's words instead
                self._draw(self.clock())
            self.stream.write("\n")
            self.stream.flush()

    def _poll_total(self, now: float) -> None:
        if self.total_source is None or now - self._last_poll < TOTAL_POLL_SECONDS:
            return
        self._last_poll = now
        try:
            total = self.total_source()
        except Exception:  # noqa: BLE001 - a progress bar must never fail the transfer
            return
        if total:
            self.total = total

    def _draw(self, now: float) -> None:
        self._last_draw = now
        self._write(transfer_line(self.label, self.done, now - self.started, self.total))

    def _write(self, line: str) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        self.stream.write("\r" + line[: max(width - 1, 10)] + "\x1b[K")
        self.stream.flush()
        self._drawn = True
