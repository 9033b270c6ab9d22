"""/proc parsers (pure: text in, values out) and the thin readers that feed them.

The parsers are unit-tested on captured text; the readers only do the I/O and
turn "the process is gone" into ``ProcessLookupError`` whatever way the kernel
said it (ENOENT on open, ESRCH on read).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat that ckptd uses (numbering as in proc(5))."""

    pid: int
    comm: str
    state: str          # field 3: R S D T t Z X I ...
    ppid: int           # field 4
    pgrp: int           # field 5
    session: int        # field 6
    num_threads: int    # field 20
    start_time: int     # field 22: clock ticks after boot; (pid, start_time) names one process

    @property
    def is_zombie(self) -> bool:
        return self.state in ("Z", "X")


@dataclass(frozen=True)
class CgroupMembership:
    """One line of /proc/PID/cgroup."""

    hierarchy_id: int               # 0 for cgroup2
    controllers: tuple[str, ...]    # empty for cgroup2; may hold "name=systemd"
    path: str


def parse_stat(text: str) -> ProcStat:
    # comm may hold spaces and parentheses: it runs to the LAST ')'.
    open_at = text.index("(")
    close_at = text.rindex(")")
    pid = int(text[:open_at])
    rest = text[close_at + 2:].split()
    field = lambda n: rest[n - 3]  # noqa: E731 - proc(5) numbers fields from 1; rest starts at 3
    return ProcStat(
        pid=pid,
        comm=text[open_at + 1:close_at],
        state=field(3),
        ppid=int(field(4)),
        pgrp=int(field(5)),
        session=int(field(6)),
        num_threads=int(field(20)),
        start_time=int(field(22)),
    )


def parse_status(text: str) -> dict[str, str]:
    """``Key:\\tvalue`` lines of /proc/PID/status, values stripped."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def parse_signal_mask(hex_mask: str) -> frozenset[int]:
    """A SigCgt/SigBlk/... mask ("0000000000004002") -> signal numbers."""
    mask = int(hex_mask, 16)
    return frozenset(n + 1 for n in range(mask.bit_length()) if mask >> n & 1)


def parse_cgroup(text: str) -> list[CgroupMembership]:
    entries = []
    for line in text.splitlines():
        if not line:
            continue
        hid, controllers, path = line.split(":", 2)
        entries.append(CgroupMembership(
            hierarchy_id=int(hid),
            controllers=tuple(c for c in controllers.split(",") if c),
            path=path,
        ))
    return entries


def _read(pid: int, name: str) -> str:
    try:
        return (PROC / str(pid) / name).read_text()
    except FileNotFoundError as e:
        raise ProcessLookupError(errno.ESRCH, "no such process", pid) from e


def read_stat(pid: int) -> ProcStat:
    return parse_stat(_read(pid, "stat"))


def read_status(pid: int) -> dict[str, str]:
    return parse_status(_read(pid, "status"))


def read_cgroup(pid: int) -> list[CgroupMembership]:
    return parse_cgroup(_read(pid, "cgroup"))


def parse_cmdline(raw: bytes) -> list[str]:
    """/proc/PID/cmdline: NUL-separated arguments (a trailing NUL ends the last)."""
    if not raw:
        return []
    return [a.decode(errors="surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")]


def read_cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return parse_cmdline(f.read())
