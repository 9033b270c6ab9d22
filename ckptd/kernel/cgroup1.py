"""The cgroup v1 freezer: ``freezer.state`` is both the request and the answer.

Writing FROZEN starts freezing; reading says FREEZING until every task is
frozen (the read itself makes the kernel re-check), then FROZEN. v1 cannot
notify, so waits poll with a short back-off. v1-frozen tasks do not act on
SIGKILL until thawed, which kill_all takes care of.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from ckptd.kernel.cgroupfs import (
    CgroupDir, FreezerState, Sleeper, read_control, read_ids, timed_out,
    write_control,
)

# While killing we freeze first so no task can fork a new one between our
# reading cgroup.procs and our signalling; a stuck task must not stop the kill.
KILL_FREEZE_TIMEOUT = 1.0

_STATES = {"THAWED": FreezerState.THAWED, "FREEZING": FreezerState.FREEZING,
           "FROZEN": FreezerState.FROZEN}


class FreezerV1(CgroupDir):
    name = "cgroup1"

    def __init__(self, mount: Path) -> None:
        self.mount = mount

    @staticmethod
    def usable(mount: Path) -> bool:
        return (mount / "freezer.state").exists() or (
            (mount / "tasks").is_file() and os.access(mount, os.W_OK)
            and _has_freezer_controller(mount))

    def threads(self, path: Path) -> list[int]:
        return read_ids(path / "tasks")

    def state(self, path: Path) -> FreezerState:
        return _STATES[read_control(path / "freezer.state").strip()]

    def freeze(self, path: Path, timeout: float) -> None:
        # A v1 freeze can stop short (a task busy forking or exiting when it
        # was asked): the state then stays FREEZING until FROZEN is written
        # again, which retries the tasks left (cgroup-v1 freezer-subsystem.rst).
        sleeper = Sleeper(timeout)
        try:
            while True:
                try:
                    write_control(path / "freezer.state", "FROZEN")
                except OSError as e:
                    if e.errno != errno.EBUSY:   # older kernels: "not all frozen yet"
                        raise
                if self.state(path) == FreezerState.FROZEN:
                    return
                if not sleeper.pause():
                    raise timed_out("freezer.state did not become FROZEN", timeout, path)
        except TimeoutError:
            # Never leave a half-frozen cgroup behind.
            write_control(path / "freezer.state", "THAWED")
            raise

    def thaw(self, path: Path, timeout: float) -> None:
        write_control(path / "freezer.state", "THAWED")
        self._wait_state(path, FreezerState.THAWED, timeout)

    def kill_all(self, path: Path) -> None:
        if not self.procs(path):
            return
        try:
            self.freeze(path, KILL_FREEZE_TIMEOUT)
        except TimeoutError:
            pass  # kill what we can; the caller's wait_empty and retry cover the rest
        pidfds = {}
        try:
            for pid in self.procs(path):
                try:
                    pidfds[pid] = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue  # already gone
            # A pid still listed after we hold its pidfd names the member we
            # mean, not a process that reused the pid after we listed it.
            members = set(self.procs(path))
            for pid, fd in pidfds.items():
                if pid in members:
                    try:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    except ProcessLookupError:
                        pass  # exited meanwhile: the goal is reached
        finally:
            for fd in pidfds.values():
                os.close(fd)
        # Frozen v1 tasks do not die until thawed.
        write_control(path / "freezer.state", "THAWED")

    def wait_empty(self, path: Path, timeout: float) -> None:
        sleeper = Sleeper(timeout)
        while self.procs(path):
            if not sleeper.pause():
                raise timed_out("cgroup still has tasks", timeout, path)

    def _wait_state(self, path: Path, want: FreezerState, timeout: float) -> None:
        sleeper = Sleeper(timeout)
        while self.state(path) != want:
            if not sleeper.pause():
                raise timed_out(f"freezer.state did not become {want.name}", timeout, path)


def _has_freezer_controller(mount: Path) -> bool:
    # A v1 hierarchy without the freezer controller has no freezer.state in
    # children either; the mount's own dir lacks it, so ask /proc/mounts.
    target = str(mount)
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[1] == target and parts[2] == "cgroup":
                return "freezer" in parts[3].split(",")
    return False
