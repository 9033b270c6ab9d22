"""The cgroup v2 freezer: ``cgroup.freeze`` to ask, ``cgroup.events`` to know.

The kernel notifies changes of cgroup.events by poll(2) with POLLPRI; we wait
for that but also re-read the file every ``RECHECK`` seconds, so a missed
notification (or a fake tree in a test, which never notifies) costs at most
that long.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

from ckptd.kernel.cgroupfs import (
    CgroupDir, FreezerState, parse_keyed, read_control, read_ids, timed_out,
    write_control,
)

RECHECK = 0.05


class FreezerV2(CgroupDir):
    name = "cgroup2"

    def __init__(self, mount: Path) -> None:
        self.mount = mount

    @staticmethod
    def usable(mount: Path) -> bool:
        """A cgroup2 mount we may create cgroups in. (Whether the kernel has
        cgroup.freeze shows only in a non-root cgroup: see open_freezer.)"""
        return (mount / "cgroup.controllers").is_file() and os.access(mount, os.W_OK)

    def threads(self, path: Path) -> list[int]:
        return read_ids(path / "cgroup.threads")

    def state(self, path: Path) -> FreezerState:
        if parse_keyed(read_control(path / "cgroup.events")).get("frozen") == 1:
            return FreezerState.FROZEN
        if read_control(path / "cgroup.freeze").strip() == "1":
            return FreezerState.FREEZING
        return FreezerState.THAWED

    def freeze(self, path: Path, timeout: float) -> None:
        write_control(path / "cgroup.freeze", "1")
        try:
            self._wait_event(path, "frozen", 1, timeout)
        except TimeoutError:
            # Never leave a half-frozen cgroup behind: the tasks that did
            # freeze would stay stopped with nobody to thaw them.
            write_control(path / "cgroup.freeze", "0")
            raise

    def thaw(self, path: Path, timeout: float) -> None:
        write_control(path / "cgroup.freeze", "0")
        self._wait_event(path, "frozen", 0, timeout)

    def kill_all(self, path: Path) -> None:
        # cgroup.kill (5.14+) kills atomically, even tasks forking right now,
        # and fatal signals get through a v2-frozen cgroup.
        write_control(path / "cgroup.kill", "1")

    def wait_empty(self, path: Path, timeout: float) -> None:
        self._wait_event(path, "populated", 0, timeout)

    def _wait_event(self, path: Path, key: str, want: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        fd = os.open(path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        try:
            poller = select.poll()
            # POLLPRI only: kernfs always reports POLLIN, which would make
            # poll return at once instead of waiting for a change.
            poller.register(fd, select.POLLPRI)
            while True:
                # Reading re-arms the notification for this open file.
                if parse_keyed(os.pread(fd, 4096, 0).decode("ascii")).get(key) == want:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise timed_out(f"cgroup.events did not say '{key} {want}'", timeout, path)
                poller.poll(min(left, RECHECK) * 1000)
        finally:
            os.close(fd)
