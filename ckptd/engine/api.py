"""The engine's entry points, in process (tests, benchmarks) — the daemon
uses the same through ``python -m ckptd.engine.worker``.

    with checkpointed(pid, sink) as cp:     # image written, task stopped
        ...                                  # cp.dumped has the figures
        cp.finish(kill=True)                 # or leave: resumed on exit
    checkpoint(pid, sink, kill=False) -> Dumped
    restore(source, target="host") -> Restored
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from typing import Any

from ckptd.engine import imagefile
from ckptd.engine.dump import Dumped, DumpSession, Progress
from ckptd.engine.restore import Restored
from ckptd.engine.restore import restore as _restore
from ckptd.errors import context
from ckptd.image import ImageReader

__all__ = ["Checkpoint", "Dumped", "Restored", "checkpoint", "checkpointed", "restore"]


class Checkpoint:
    """A written checkpoint whose task is still stopped until ``finish``."""

    def __init__(self, session: DumpSession, dumped: Dumped) -> None:
        self.session = session
        self.dumped = dumped
        self.frozen_ms: float | None = None

    def finish(self, kill: bool = False) -> float:
        if self.frozen_ms is None:
            self.frozen_ms = self.session.finish(kill=kill)
        return self.frozen_ms


@contextlib.contextmanager
def checkpointed(pid: int, sink, *, cgroup: str | None = None, freezer: str | None = None,
                 source: dict[str, Any] | None = None,
                 progress: Progress | None = None, ignore_pids: Collection[int] = (),
                 externals: Collection[str] = (), viewer: int = 0) -> Iterator[Checkpoint]:
    """``externals``: names of resources shared with processes outside the
    tree to accept as private copies (a refusal's report lists them);
    ``ignore_pids``: outside processes whose sharing is expected (leaks.py)."""
    session = DumpSession(pid, cgroup=cgroup, freezer=freezer, ignore_pids=ignore_pids,
                          externals=externals, viewer=viewer)
    cp: Checkpoint | None = None
    prepared: imagefile.Prepared | None = None
    try:
        with context(pid=pid):
            # While the tree still runs: what it saves is frozen time.
            prepared = imagefile.prepare(sink, pid, progress)
            try:
                session.start()
                if progress:
                    progress("collecting", 0, 0)
                session.collect(source)
                out = prepared.sink if prepared is not None else sink
                cp = Checkpoint(session, session.write(out, progress))
            finally:
                if prepared is not None:
                    prepared.trim()   # to the image's end, or as far as a failed one got
        yield cp
    finally:
        try:
            if cp is None or cp.frozen_ms is None:
                session.finish(kill=False)   # failed or never finished: resume untouched
        finally:
            if prepared is not None:
                prepared.close()   # once the tree runs again: unmapping 1 GiB takes ~30 ms


def checkpoint(pid: int, sink, *, kill: bool = False, **kwargs: Any) -> Dumped:
    with checkpointed(pid, sink, **kwargs) as cp:
        cp.finish(kill=kill)
        return cp.dumped


def restore(source, *, target: str = "host",
            stub: Callable[[dict[str, Any]], int | dict[str, Any] | None] | None = None,
            progress: Progress | None = None) -> Restored:
    return _restore(ImageReader(source), target=target, stub=stub, progress=progress)
