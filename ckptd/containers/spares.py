"""Processes started ahead of need.

Starting a helper process costs more than the work it then does (a shim:
~65 ms of interpreter and imports; an engine worker forked from the fork
server: a few ms, ~135 ms when it must start fresh; a checkpoint of a small
process takes ~15 ms). ``Spares`` keeps a few started and waiting for their
first instruction, and tops them up in the background when one is taken.

A spare starts under SCHED_IDLE: on two cores its start-up would otherwise
take CPU from the operations that run meanwhile (it costs far more CPU than
they do). It runs under SCHED_OTHER again from the moment it is taken,
before it is told anything.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import structlog

from ckptd import errors

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Spares(Generic[T]):
    def __init__(self, name: str, count: int, make: Callable[[], T],
                 alive: Callable[[T], bool], discard: Callable[[T], None],
                 pid: Callable[[T], int] | None = None) -> None:
        self._name = name
        self._pid = pid
        self._count = count
        self._make = make
        self._alive = alive
        self._discard = discard
        self._lock = threading.Lock()
        self._ready: list[T] = []
        self._filling: threading.Thread | None = None
        self._closed = False
        self._top_up_later()

    def take(self) -> T:
        """A spare if one is ready and alive, else a new one made now."""
        found: T | None = None
        dead: list[T] = []
        with self._lock:
            while self._ready and found is None:
                item = self._ready.pop(0)
                if self._alive(item):
                    found = item
                else:
                    dead.append(item)
        for item in dead:
            self._discard(item)
        if found is not None and self._pid is not None:
            _set_policy(self._pid(found), os.SCHED_OTHER)
        self._top_up_later()
        return found if found is not None else self._make()

    def close(self) -> None:
        """Discard the spares, after the one being made, if any: nothing we
        started may outlive this (not even as a zombie)."""
        with self._lock:
            self._closed = True
            filling = self._filling
        if filling is not None:
            filling.join()
        with self._lock:
            ready, self._ready = self._ready, []
        for item in ready:
            self._discard(item)

    def _top_up_later(self) -> None:
        with self._lock:
            if self._filling is not None or self._closed:
                return
            self._filling = threading.Thread(target=self._top_up, name=f"{self._name}-spares",
                                             daemon=True)
            self._filling.start()

    def _top_up(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed or len(self._ready) >= self._count:
                        return
                try:
                    item = self._make()
                    if self._pid is not None:
                        _set_policy(self._pid(item), os.SCHED_IDLE)
                except errors.CkptdError as e:
                    # The next take() makes one itself and reports the error.
                    log.warning("spare_start_failed", kind=self._name, error=str(e))
                    return
                with self._lock:
                    keep = not self._closed
                    if keep:
                        self._ready.append(item)
                if not keep:
                    self._discard(item)
                    return
        finally:
            with self._lock:
                self._filling = None


def _set_policy(pid: int, policy: int) -> None:
    """Every thread of ``pid`` (the policy is per thread); a process gone
    meanwhile is the caller's to notice."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except OSError as e:
            log.debug("spare_policy_not_set", pid=pid, tid=tid, error=str(e))
