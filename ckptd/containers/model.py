"""Values that describe containers: what to run, and what one looks like now.

These frozen dataclasses are the contract between the container layer and the
server, which translates them to and from the API messages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class State(enum.Enum):
    RUNNING = "running"
    FROZEN = "frozen"
    EXITED = "exited"
    # A record without a live init or an exit status (e.g. after a reboot).
    LOST = "lost"


class Network(enum.Enum):
    HOST = "host"   # share the host's network namespace
    NEW = "new"     # new network namespace with loopback up


@dataclass(frozen=True)
class RunSpec:
    """What ``Run`` asks for."""

    argv: tuple[str, ...]
    name: str = ""
    env: tuple[str, ...] = ()          # KEY=VALUE; empty -> a minimal default
    cwd: str = "/"
    hostname: str = ""                 # empty -> the name, else the id
    network: Network = Network.HOST
    tty: bool = False
    # Who asked (from SO_PEERCRED): the init runs with these ids, so a caller
    # never gets more privilege through the daemon than it has. Root: 0, 0.
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class ContainerInfo:
    """A container as it is now (a snapshot, computed on demand)."""

    id: str
    name: str
    state: State
    argv: tuple[str, ...]
    hostname: str
    network: Network
    tty: bool
    init_pid: int                      # in the host PID namespace; 0 if none
    init_ns_pid: int                   # in the container's PID namespace (1)
    cgroup_path: str                   # absolute path in the cgroup file system
    started_at: float                  # unix time
    exited_at: float | None = None
    exit_code: int | None = None       # set when EXITED normally
    exit_signal: int | None = None     # set when EXITED by a signal
    owner_uid: int = 0                 # uid of the caller that created it
    num_tasks: int = 0
    rss_bytes: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)
