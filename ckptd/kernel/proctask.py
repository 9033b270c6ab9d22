"""/proc parsers for what a checkpoint reads about one task: smaps, fdinfo,
limits, timers and the mm fields of stat. Pure parsers first, readers last."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

PROC = "/proc"
RLIM_INFINITY = (1 << 64) - 1


@dataclass(frozen=True)
class SmapsVma:
    start: int
    end: int
    perms: str          # "rw-p"
    offset: int
    dev: str            # "fd:01"
    inode: int
    path: str           # "" for anonymous; "[heap]", "/usr/lib/..." ...
    vm_flags: frozenset[str]

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"


_HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$")


def parse_smaps(text: str) -> list[SmapsVma]:
    """/proc/PID/smaps (or maps: VmFlags then stay empty)."""
    out: list[SmapsVma] = []
    cur: dict | None = None
    for line in text.splitlines():
        m = _HEAD.match(line)
        if m:
            if cur is not None:
                out.append(SmapsVma(**cur))
            cur = dict(start=int(m[1], 16), end=int(m[2], 16), perms=m[3],
                       offset=int(m[4], 16), dev=m[5], inode=int(m[6]), path=m[7],
                       vm_flags=frozenset())
        elif line.startswith("VmFlags:") and cur is not None:
            cur["vm_flags"] = frozenset(line.split()[1:])
    if cur is not None:
        out.append(SmapsVma(**cur))
    return out


@dataclass(frozen=True)
class FdInfo:
    pos: int
    flags: int          # octal in the file
    mnt_id: int
    ino: int
    extra: dict[str, str]
    locks: list[str] = field(default_factory=list)   # the "lock:" lines' values


def parse_fdinfo(text: str) -> FdInfo:
    fields: dict[str, str] = {}
    locks: list[str] = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
            if key == "lock":
                locks.append(value.strip())
    return FdInfo(pos=int(fields.get("pos", "0")), flags=int(fields.get("flags", "0"), 8),
                  mnt_id=int(fields.get("mnt_id", "0")), ino=int(fields.get("ino", "0")),
                  extra=fields, locks=locks)


# /proc/PID/limits row names, in RLIMIT_* order.
LIMIT_NAMES = ["Max cpu time", "Max file size", "Max data size", "Max stack size",
               "Max core file size", "Max resident set", "Max processes",
               "Max open files", "Max locked memory", "Max address space",
               "Max file locks", "Max pending signals", "Max msgqueue size",
               "Max nice priority", "Max realtime priority", "Max realtime timeout"]


def parse_limits(text: str) -> dict[int, tuple[int, int]]:
    """resource number -> (soft, hard), RLIM_INFINITY for "unlimited"."""
    out = {}
    for line in text.splitlines()[1:]:
        for res, name in enumerate(LIMIT_NAMES):
            if line.startswith(name):
                parts = line[len(name):].split()
                soft, hard = (RLIM_INFINITY if p == "unlimited" else int(p) for p in parts[:2])
                out[res] = (soft, hard)
                break
    return out


@dataclass(frozen=True)
class TimerInfo:
    id: int
    signo: int
    sigval: int
    notify: str         # "signal", "none", "thread"
    notify_pid: int
    clock_id: int


def parse_timers(text: str) -> list[TimerInfo]:
    out = []
    cur: dict[str, str] = {}
    for line in text.splitlines() + ["ID: end"]:
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "ID" and cur:
            sig, _, val = cur["signal"].partition("/")
            how, _, who = cur["notify"].partition("/")
            out.append(TimerInfo(id=int(cur["ID"]), signo=int(sig), sigval=int(val, 16),
                                 notify=how, notify_pid=int(who.split(".")[-1] or 0),
                                 clock_id=int(cur["ClockID"])))
            cur = {}
        cur[key] = value
    return out


@dataclass(frozen=True)
class MmFields:
    start_code: int
    end_code: int
    start_stack: int
    start_data: int
    end_data: int
    start_brk: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int


def parse_stat_mm(text: str) -> MmFields:
    rest = text[text.rindex(")") + 2:].split()
    f = lambda n: int(rest[n - 3])  # noqa: E731 - proc(5) field numbers
    return MmFields(start_code=f(26), end_code=f(27), start_stack=f(28), start_data=f(45),
                    end_data=f(46), start_brk=f(47), arg_start=f(48), arg_end=f(49),
                    env_start=f(50), env_end=f(51))


def _read(pid: int, name: str) -> str:
    with open(f"{PROC}/{pid}/{name}", encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def read_smaps(pid: int) -> list[SmapsVma]:
    return parse_smaps(_read(pid, "smaps"))


def read_maps(pid: int) -> str:
    """/proc/PID/maps: what parse_smaps needs but the sizes, at a fraction
    of the kernel's cost (smaps walks every page table)."""
    return _read(pid, "maps")


def read_fdinfo(pid: int, fd: int) -> FdInfo:
    return parse_fdinfo(_read(pid, f"fdinfo/{fd}"))


def read_limits(pid: int) -> dict[int, tuple[int, int]]:
    return parse_limits(_read(pid, "limits"))


def read_timers(pid: int) -> list[TimerInfo]:
    try:
        return parse_timers(_read(pid, "timers"))
    except FileNotFoundError:
        return []


def read_stat_mm(pid: int) -> MmFields:
    return parse_stat_mm(_read(pid, "stat"))


def list_fds(pid: int) -> list[int]:
    return sorted(int(n) for n in os.listdir(f"{PROC}/{pid}/fd"))


def list_threads(pid: int) -> list[int]:
    return sorted(int(n) for n in os.listdir(f"{PROC}/{pid}/task"))


def read_children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in list_threads(pid):
        try:
            out += [int(x) for x in _read(pid, f"task/{tid}/children").split()]
        except FileNotFoundError:
            pass  # thread exited meanwhile
    return out


def read_auxv(pid: int) -> bytes:
    with open(f"{PROC}/{pid}/auxv", "rb") as f:
        return f.read()
