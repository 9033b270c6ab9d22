"""The containers one daemon knows, by id and by name; thread-safe.

An ``Entry`` holds a container's current record and the lock that serializes
operations on it (freeze, kill, delete ...); reading state takes no entry lock,
so a slow freeze does not block ``list``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from ckptd.containers.records import Record
from ckptd.errors import AlreadyExistsError, NotFoundError

MIN_PREFIX = 3   # shorter prefixes are too likely to be typos that hit something


class Entry:
    """Mutable holder: ``record`` is replaced (under ``lock``), never changed."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.lock = threading.Lock()
        self.deleted = False


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, Entry] = {}
        self._names: dict[str, str] = {}   # name -> id, including names being started

    @contextlib.contextmanager
    def reserving(self, name: str, cid: str) -> Iterator[None]:
        """Hold ``name`` (and ``cid``) while a container starts; released unless
        ``add`` was called for ``cid`` by the end of the block."""
        with self._lock:
            if name in self._names:
                raise AlreadyExistsError(f"a container named {name!r} already exists",
                                         container=self._names[name])
            if cid in self._by_id or cid in self._names.values():
                raise AlreadyExistsError(f"container id {cid} is taken")
            self._names[name] = cid
        try:
            yield
        finally:
            with self._lock:
                if cid not in self._by_id:
                    self._names.pop(name, None)

    def load(self, entries: list[Entry]) -> None:
        """Replace everything (daemon start: records reloaded from disk)."""
        with self._lock:
            self._by_id = {e.record.id: e for e in entries}
            self._names = {e.record.name: e.record.id for e in entries}

    def add(self, entry: Entry) -> None:
        with self._lock:
            self._by_id[entry.record.id] = entry
            self._names[entry.record.name] = entry.record.id

    def remove(self, entry: Entry) -> None:
        with self._lock:
            entry.deleted = True
            self._by_id.pop(entry.record.id, None)
            if self._names.get(entry.record.name) == entry.record.id:
                del self._names[entry.record.name]

    def entries(self) -> list[Entry]:
        with self._lock:
            return sorted(self._by_id.values(), key=lambda e: (e.record.started_at, e.record.id))

    def resolve(self, ref: str) -> Entry:
        """By id, then name, then unique id prefix (at least MIN_PREFIX chars)."""
        with self._lock:
            if ref in self._by_id:
                return self._by_id[ref]
            cid = self._names.get(ref)
            if cid is not None and cid in self._by_id:
                return self._by_id[cid]
            if len(ref) >= MIN_PREFIX:
                matches = [e for i, e in self._by_id.items() if i.startswith(ref)]
                if len(matches) == 1:
                    return matches[0]
                if matches:
                    ids = ", ".join(sorted(e.record.id for e in matches))
                    raise NotFoundError(f"container prefix {ref!r} is ambiguous: {ids}")
        raise NotFoundError(f"no container {ref!r}")
