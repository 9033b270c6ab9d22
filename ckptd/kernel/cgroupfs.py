"""The freezer interface, and reading/writing cgroup control files.

One ``Freezer`` Protocol, two backends (cgroup2.py, cgroup1.py), picked by
``freezer.open_freezer``. A backend owns a cgroup hierarchy mounted at
``mount`` and acts on cgroups given by absolute path: create and remove them,
list their tasks, freeze and thaw them (returning only once the kernel says it
is done), and kill everything in them.

Backends never leave a cgroup half-frozen: if freezing times out they thaw it
back and raise ``TimeoutError`` (an OSError with ETIMEDOUT).
"""

from __future__ import annotations

import enum
import errno
import os
import time
from pathlib import Path
from typing import Protocol


class FreezerState(enum.Enum):
    THAWED = "thawed"
    FREEZING = "freezing"   # asked to freeze, not all tasks frozen yet
    FROZEN = "frozen"


class Freezer(Protocol):
    name: str               # "cgroup2" or "cgroup1"
    mount: Path             # where the hierarchy is mounted

    def create(self, path: Path) -> None:
        """mkdir the cgroup (its parent must exist); FileExistsError if it does."""

    def remove(self, path: Path, timeout: float) -> None:
        """rmdir the cgroup, retrying while the kernel still holds exited tasks."""

    def join_file(self, path: Path) -> Path:
        """The file to which a process writes "0" to move itself in."""

    def procs(self, path: Path) -> list[int]:
        """Thread-group ids of the processes in the cgroup (host pid namespace)."""

    def threads(self, path: Path) -> list[int]:
        """Thread ids of every thread in the cgroup."""

    def state(self, path: Path) -> FreezerState: ...

    def freeze(self, path: Path, timeout: float) -> None:
        """Return once every task is frozen; on timeout thaw back, raise TimeoutError."""

    def thaw(self, path: Path, timeout: float) -> None:
        """Return once no task is frozen any more."""

    def kill_all(self, path: Path) -> None:
        """Send SIGKILL to every task; does not wait for them to go."""

    def wait_empty(self, path: Path, timeout: float) -> None:
        """Return once no task is left; TimeoutError otherwise."""


def read_control(path: Path) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def write_control(path: Path, text: str) -> None:
    # One write(2) call: cgroup files act on each write, so buffering that
    # splits or merges writes would change what the kernel sees.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def read_ids(path: Path) -> list[int]:
    """cgroup.procs / cgroup.threads / tasks: one decimal id per line."""
    return [int(line) for line in read_control(path).split()]


def parse_keyed(text: str) -> dict[str, int]:
    """Flat keyed files such as cgroup.events: ``key value`` lines."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key:
            values[key] = int(value)
    return values


def timed_out(what: str, timeout: float, path: Path) -> TimeoutError:
    return TimeoutError(errno.ETIMEDOUT, f"{what} within {timeout:g} s", str(path))


class Sleeper:
    """Back-off for polling files that cannot notify: short first, then capped,
    until a deadline. ``pause()`` returns False once the deadline has passed."""

    FIRST = 0.001   # freezing an idle cgroup takes well under a millisecond
    CAP = 0.02      # keeps a polled wait responsive without spinning

    def __init__(self, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout
        self._delay = self.FIRST

    def pause(self) -> bool:
        left = self._deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(self._delay, left))
        self._delay = min(self._delay * 2, self.CAP)
        return True


def remove_dir(path: Path, timeout: float) -> None:
    """rmdir a cgroup. EBUSY while tasks that just exited are still charged to
    it, so retry until ``timeout``; a cgroup already gone is fine."""
    sleeper = Sleeper(timeout)
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or not sleeper.pause():
                raise


class CgroupDir:
    """What both hierarchies do alike with a cgroup directory; the backends
    add their own freezing, killing and thread listing."""

    def create(self, path: Path) -> None:
        path.mkdir()

    def remove(self, path: Path, timeout: float) -> None:
        remove_dir(path, timeout)

    def join_file(self, path: Path) -> Path:
        return path / "cgroup.procs"

    def procs(self, path: Path) -> list[int]:
        return read_ids(path / "cgroup.procs")


def cgroup_of(pid: int, freezer: Freezer) -> Path | None:
    """The cgroup of ``freezer``'s hierarchy that ``pid`` is in (a zombie
    keeps the one it died in); None if there is no such process."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if (controllers == "") if freezer.name == "cgroup2" else "freezer" in controllers.split(","):
            return freezer.mount / path.lstrip("/")
    return None
