"""What survives a daemon restart: one directory per container under
``<state_dir>/containers/<id>/`` holding

    record.json   the container's record, written by the daemon
    exit.json     how its init ended, written by the shim
    log           the container's stdout/stderr (or pty output)
    shim.log      the shim's own stderr, for post-mortems

Every JSON file is written atomically (temporary file + rename), so a crash
leaves the old version or the new one, never half of one. This module is
imported by the shim too: keep it light (no structlog, no psutil).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.containers.model import Network, RunSpec

RECORD_VERSION = 1


@dataclass(frozen=True)
class ContainerDir:
    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def record(self) -> Path:
        return self.path / "record.json"

    @property
    def exit_status(self) -> Path:
        return self.path / "exit.json"

    @property
    def log(self) -> Path:
        return self.path / "log"

    @property
    def shim_log(self) -> Path:
        return self.path / "shim.log"


def containers_dir(state_dir: Path) -> Path:
    return state_dir / "containers"


def container_dir(state_dir: Path, cid: str) -> ContainerDir:
    return ContainerDir(containers_dir(state_dir) / cid)


@dataclass(frozen=True)
class ExitStatus:
    """How the init ended: exactly one of exit_code / exit_signal is set."""

    exit_code: int | None
    exit_signal: int | None
    exited_at: float

    @classmethod
    def from_wait_status(cls, status: int, when: float | None = None) -> ExitStatus:
        code = os.waitstatus_to_exitcode(status)
        when = time.time() if when is None else when
        if code < 0:
            return cls(exit_code=None, exit_signal=-code, exited_at=when)
        return cls(exit_code=code, exit_signal=None, exited_at=when)


@dataclass(frozen=True)
class Record:
    """A container as the daemon knows it, apart from what the kernel says now."""

    id: str
    name: str
    spec: RunSpec
    hostname: str
    backend: str                 # freezer backend: "cgroup2" or "cgroup1"
    cgroup_path: str             # absolute
    started_at: float
    owner_uid: int
    # 0 until the shim reported; (pid, start time) name one process for good.
    init_pid: int = 0
    init_start_time: int = 0
    shim_pid: int = 0
    shim_start_time: int = 0
    # True while the daemon has it frozen; a frozen cgroup whose record says
    # False was frozen by someone else, or by a daemon that crashed mid-way.
    frozen_by_daemon: bool = False
    notes: tuple[str, ...] = ()
    domainname: str = ""         # UTS domain name; empty leaves the kernel's "(none)"

    def with_note(self, note: str) -> Record:
        if note in self.notes:
            return self
        return dataclasses.replace(self, notes=(*self.notes, note))


def record_to_json(record: Record) -> dict[str, Any]:
    data = dataclasses.asdict(record)
    data["spec"]["network"] = record.spec.network.value
    data["version"] = RECORD_VERSION
    return data


def record_from_json(data: dict[str, Any]) -> Record:
    if data.get("version") != RECORD_VERSION:
        raise ValueError(f"record version {data.get('version')!r}, expected {RECORD_VERSION}")
    fields = {f.name for f in dataclasses.fields(Record)}
    values = {k: v for k, v in data.items() if k in fields}
    spec = dict(values["spec"])
    spec["argv"] = tuple(spec["argv"])
    spec["env"] = tuple(spec["env"])
    spec["network"] = Network(spec["network"])
    values["spec"] = RunSpec(**spec)
    values["notes"] = tuple(values.get("notes", ()))
    return Record(**values)


def write_json_atomic(path: Path, data: dict[str, Any], *, durable: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        if durable:
            # Data before the rename: after a power cut the new name must not
            # point at an empty file.
            os.fsync(f.fileno())
    os.replace(tmp, path)


def save_record(cdir: ContainerDir, record: Record, *, durable: bool = True) -> None:
    """``durable=False`` for a record that only has to survive a crash of the
    daemon (the page cache does), not a power cut: it saves an fsync
    (~3-5 ms here) on the way to starting a container."""
    write_json_atomic(cdir.record, record_to_json(record), durable=durable)


def load_record(cdir: ContainerDir) -> Record:
    """Raises OSError if unreadable, ValueError/KeyError/TypeError if malformed."""
    with open(cdir.record, encoding="utf-8") as f:
        return record_from_json(json.load(f))


def save_exit_status(cdir: ContainerDir, status: ExitStatus) -> None:
    write_json_atomic(cdir.exit_status, dataclasses.asdict(status))


def load_exit_status(cdir: ContainerDir) -> ExitStatus | None:
    """None while the init has not exited (or the shim could not tell)."""
    try:
        with open(cdir.exit_status, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    return ExitStatus(exit_code=data["exit_code"], exit_signal=data["exit_signal"],
                      exited_at=data["exited_at"])
