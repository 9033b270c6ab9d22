"""What a container is now: its record, plus what the kernel and its shim say.

State is never stored, always observed: exit.json present -> EXITED; the init
(pid, start time) alive -> RUNNING, or FROZEN if its cgroup is frozen; else
the init is gone without an exit status -> LOST (after giving a shim that is
still finishing up a moment to write exit.json).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from ckptd.containers.model import ContainerInfo, State
from ckptd.containers.records import ContainerDir, ExitStatus, Record, load_exit_status
from ckptd.kernel import process, procfs
from ckptd.kernel.cgroupfs import Freezer, FreezerState

# The shim writes exit.json right after reaping the init; this only covers
# that gap (and a pty drain), never a real wait.
EXIT_STATUS_GRACE = 2.0
ZOMBIE_POLL = 0.005   # the daemon's reaper thread needs well under a millisecond


@dataclass(frozen=True)
class Observed:
    state: State
    exit: ExitStatus | None = None
    note: str | None = None        # why it is LOST


def observe(record: Record, cdir: ContainerDir, freezer: Freezer,
            grace: float = EXIT_STATUS_GRACE) -> Observed:
    if (status := load_exit_status(cdir)) is not None:
        return Observed(State.EXITED, status)
    if record.init_pid == 0:
        return Observed(State.LOST, note="the daemon stopped while starting it")
    if process.is_running(record.init_pid, record.init_start_time):
        frozen = cgroup_state(freezer, Path(record.cgroup_path)) == FreezerState.FROZEN
        return Observed(State.FROZEN if frozen else State.RUNNING)
    wait_for_shim(record, grace, cdir)
    if (status := load_exit_status(cdir)) is not None:
        return Observed(State.EXITED, status)
    return Observed(State.LOST, note=(
        f"init process {record.init_pid} is gone and no exit status was recorded "
        "(its shim was killed, or the machine rebooted)"))


def wait_for_shim(record: Record, timeout: float, cdir: ContainerDir | None = None) -> bool:
    """Wait until the container's shim has exited (it writes exit.json just
    before). False if it is still running after ``timeout``. A process
    without a shim (restored in the host PID namespace) is reaped by the
    daemon, which writes exit.json before reaping: wait while it is a zombie."""
    if record.shim_pid == 0:
        if cdir is None or not record.init_pid:
            return True
        deadline = time.monotonic() + timeout
        while not cdir.exit_status.exists() and _zombie(record):
            if time.monotonic() >= deadline:
                return False
            time.sleep(ZOMBIE_POLL)
        return True
    try:
        with process.pidfd(record.shim_pid, record.shim_start_time) as fd:
            return process.wait_exit(fd, timeout)
    except ProcessLookupError:
        return True   # gone already (or its pid reused, which means gone too)


def _zombie(record: Record) -> bool:
    try:
        stat = procfs.read_stat(record.init_pid)
    except ProcessLookupError:
        return False
    return stat.start_time == record.init_start_time and stat.is_zombie


def cgroup_state(freezer: Freezer, path: Path) -> FreezerState | None:
    try:
        return freezer.state(path)
    except OSError:
        return None   # the cgroup is gone (or never made): it freezes nothing


def describe(record: Record, observed: Observed, freezer: Freezer) -> ContainerInfo:
    path = Path(record.cgroup_path)
    try:
        threads = freezer.threads(path)
        procs = freezer.procs(path)
    except OSError:
        threads, procs = [], []    # no cgroup any more: no tasks
    notes = record.notes + ((observed.note,) if observed.note else ())
    status = observed.exit
    spec = record.spec
    return ContainerInfo(
        id=record.id,
        name=record.name,
        state=observed.state,
        argv=spec.argv,
        hostname=record.hostname,
        network=spec.network,
        tty=spec.tty,
        init_pid=record.init_pid,
        init_ns_pid=1 if record.init_pid else 0,
        cgroup_path=record.cgroup_path,
        started_at=record.started_at,
        exited_at=status.exited_at if status else None,
        exit_code=status.exit_code if status else None,
        exit_signal=status.exit_signal if status else None,
        owner_uid=record.owner_uid,
        num_tasks=len(threads),
        rss_bytes=_rss(procs),
        notes=notes,
    )


def _rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue   # exited between listing and reading: it holds no memory now
    return total
