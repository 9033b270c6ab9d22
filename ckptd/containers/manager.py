"""ContainerManager: the container lifecycle that the server calls.

It ties the pieces together: records (what survives a restart), the shim
(how a container starts and outlives us), the freezer backend (freeze, thaw,
kill everything) and status (what a container is now). Thread-safe: gRPC calls
it from several threads; operations on one container are serialized by that
container's lock, reads take none.

Several daemons may run side by side, each with its own state_dir and cgroup
root; a manager only ever touches its own. ``close()`` stops our threads and
never touches a container.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import pwd
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from signal import SIGKILL, SIGSTOP, SIGTERM, Signals

import structlog

from ckptd import errors, native
from ckptd.containers import launch, status
from ckptd.containers.faults import kernel_call
from ckptd.containers.model import ContainerInfo, Network, RunSpec, State
from ckptd.containers.reaper import ShimReaper
from ckptd.containers.records import (
    ContainerDir, Record, container_dir, containers_dir, load_record, save_exit_status,
    save_record,
)
from ckptd.containers.registry import Entry, Registry
from ckptd.containers.shim import ShimConfig
from ckptd.errors import NotFoundError, StateError, TimeoutError_, UsageError
from ckptd.kernel import cgroupfs, process, procfs, proctask
from ckptd.kernel.cgroupfs import Freezer, FreezerState
from ckptd.kernel.freezer import KINDS, make_freezer, open_freezer

log = structlog.get_logger(__name__)

ID_BYTES = 6                   # 12 hex chars, as the API promises
# Names double as default hostnames, which the kernel caps at 64 bytes.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
HOSTNAME_MAX = 64
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_TERM = "xterm"
# SIGKILLed tasks die within milliseconds unless stuck in uninterruptible sleep.
KILL_WAIT = 5.0
# Between cgroup-wide SIGKILL rounds: a v1 walk can miss a task forked mid-way.
KILL_ROUND = 0.2
# rmdir gives EBUSY for a moment after the last task exits.
CGROUP_REMOVE_WAIT = 2.0
STUB = "ckptd-stub"           # the native program a restored task starts as
FOUND_FROZEN_NOTE = "cgroup was found frozen after a daemon restart"
_ENDED = (State.EXITED, State.LOST)


class ContainerManager:
    def __init__(self, state_dir: Path, cgroup_root: str = "ckptd", *, freezer: str = "auto",
                 cgroup_v1_mount: Path = Path("/sys/fs/cgroup/freezer"),
                 cgroup_v2_mount: Path = Path("/sys/fs/cgroup/unified")) -> None:
        if freezer not in KINDS:
            raise UsageError(f"freezer must be one of {', '.join(KINDS)}, not {freezer!r}")
        root = Path(cgroup_root)
        if not cgroup_root or root.is_absolute() or ".." in root.parts:
            raise UsageError(f"cgroup_root must be a relative path without '..': {cgroup_root!r}")
        self.state_dir = Path(state_dir)
        self._v1_mount = Path(cgroup_v1_mount)
        self._v2_mount = Path(cgroup_v2_mount)
        with kernel_call("creating the state directory"):
            containers_dir(self.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        with kernel_call("setting up the freezer cgroup root"):
            self._freezer = open_freezer(freezer, cgroup_root, self._v1_mount, self._v2_mount)
        self.backend_name: str = self._freezer.name
        self.cgroup_root_path: Path = self._freezer.mount / cgroup_root
        self._lock = threading.Lock()
        self._backends: dict[str, Freezer] = {self._freezer.name: self._freezer}
        self._registry = Registry()
        self._reaper = ShimReaper()
        self._shims = launch.ShimPool()
        log.info("container_manager_ready", state_dir=str(self.state_dir),
                 backend=self.backend_name, cgroup_root=str(self.cgroup_root_path))

    # --- queries ---------------------------------------------------------

    def recover(self) -> list[ContainerInfo]:
        """Reload every record from state_dir and see what became of each."""
        found: list[tuple[Entry, status.Observed]] = []
        for path in sorted(containers_dir(self.state_dir).iterdir()):
            if not path.is_dir():
                continue
            cdir = ContainerDir(path)
            try:
                record = load_record(cdir)
            except FileNotFoundError:
                # A daemon that died within run() between mkdir and the first
                # record; left for a person to look at, as we know nothing of it.
                log.warning("container_dir_without_record", path=str(path))
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("record_unreadable", path=str(path), error=str(e))
                continue
            observed = self._observe(record)
            if observed.state == State.FROZEN and not record.frozen_by_daemon:
                # Left frozen by a daemon that crashed mid-operation, or by
                # someone else: report it rather than silently thaw or forget.
                record = record.with_note(FOUND_FROZEN_NOTE)
                self._save(record)
            found.append((Entry(record), observed))
        self._registry.load([entry for entry, _ in found])
        infos = [self._describe(entry.record, observed) for entry, observed in found]
        log.info("containers_recovered", count=len(infos),
                 **collections.Counter(info.state.value for info in infos))
        return infos

    def list(self) -> list[ContainerInfo]:
        infos = [(entry, self._info(entry.record)) for entry in self._registry.entries()]
        # Deleted while we looked (its files half gone): not a container any more.
        return [info for entry, info in infos if not entry.deleted]

    def get(self, ref: str) -> ContainerInfo:
        entry = self._registry.resolve(ref)
        info = self._info(entry.record)
        if entry.deleted:
            raise NotFoundError(f"no container {ref!r}")
        return info

    def log_path(self, ref: str) -> Path:
        return self._cdir(self._registry.resolve(ref).record).log

    # --- lifecycle -------------------------------------------------------

    def run(self, spec: RunSpec) -> ContainerInfo:
        _check_spec(spec)
        return self._start(spec, starter="exec")

    def _start(self, spec: RunSpec, *, starter: str, owner_uid: int | None = None,
               domainname: str = "") -> ContainerInfo:
        began = time.monotonic()
        cid = secrets.token_hex(ID_BYTES)
        name = spec.name or cid
        freezer = self._freezer
        cgroup = self.cgroup_root_path / cid
        cdir = container_dir(self.state_dir, cid)
        # No error context with the id: after a failed start the id names nothing.
        with self._registry.reserving(name, cid), contextlib.ExitStack() as undo:
            self._make_home(undo, cdir, freezer, cgroup)
            record = Record(
                id=cid, name=name, spec=spec, hostname=spec.hostname or name,
                backend=freezer.name, cgroup_path=str(cgroup), started_at=time.time(),
                owner_uid=spec.uid if owner_uid is None else owner_uid,
                domainname=domainname,
            )
            # Before the shim: a daemon crash from here on leaves a trace (after
            # a power cut there is no container to find anyway).
            self._save(record, durable=False)
            try:
                started = launch.start_shim(self._shim_config(record, freezer, starter),
                                            cdir.shim_log, self._shims)
            except errors.CkptdError as e:
                log.info("container_start_failed", container=cid, error=str(e))
                raise
            undo.callback(self._abandon_shim, started, freezer, cgroup)
            record = dataclasses.replace(
                record, init_pid=started.init_pid, init_start_time=started.init_start_time,
                shim_pid=started.shim.pid, shim_start_time=started.shim_start_time)
            self._save(record)
            self._reaper.watch(started.shim, cid, started.init_pid, started.init_start_time)
            self._registry.add(Entry(record))
            undo.pop_all()
        log.info("container_started", container=cid, name=name, pid=record.init_pid,
                 backend=freezer.name, starter=starter, ms=_ms_since(began))
        return self._info(record)

    # --- checkpoint and restart support ------------------------------------

    def freezer_name(self, ref: str) -> str:
        return self._registry.resolve(ref).record.backend

    def shim_pid(self, ref: str) -> int:
        """The container's live shim (it holds the container's log and pty),
        0 if it has none or it is gone (its pid may be someone else's now)."""
        record = self._registry.resolve(ref).record
        if record.shim_pid and process.is_running(record.shim_pid, record.shim_start_time):
            return record.shim_pid
        return 0

    def note(self, ref: str, text: str) -> None:
        """A line for Status; not worth an fsync: lost to a power cut, the
        container's state and exit status still say what happened."""
        with self._locked(ref) as entry:
            self._update(entry, entry.record.with_note(text), durable=False)

    def thaw_after_failure(self, ref: str) -> None:
        """Last resort after a failed checkpoint whose worker could not thaw."""
        try:
            with self._locked(ref) as entry:
                record = entry.record
                path = Path(record.cgroup_path)
                if status.cgroup_state(self._backend(record), path) == FreezerState.FROZEN:
                    self._backend(record).thaw(path, 10.0)
                    log.warning("container_thawed_after_failure", container=record.id)
        except (errors.CkptdError, OSError) as e:
            log.error("thaw_after_failure_failed", container=ref, error=str(e))

    def create_stub(self, *, name: str, hostname: str, network: Network, owner_uid: int,
                    domainname: str = "") -> ContainerInfo:
        """A new container whose init is the restore stub, waiting to be
        restored into. ``name`` falls back to the id when it is taken."""
        if name and (not NAME_RE.fullmatch(name) or self._name_taken(name)):
            log.info("restore_name_taken", name=name)
            name = ""
        spec = RunSpec(argv=(str(native.binary(STUB)),), name=name, hostname=hostname,
                       network=network)
        return self._start(spec, starter="stub", owner_uid=owner_uid, domainname=domainname)

    def finish_stub(self, ref: str) -> ContainerInfo:
        """The stub has become the restored process: record what it runs now."""
        with self._locked(ref) as entry:
            record = entry.record
            try:
                argv = tuple(procfs.read_cmdline(record.init_pid))
            except (OSError, ValueError):
                argv = record.spec.argv   # it exited already: keep what we had
            self._update(entry, dataclasses.replace(
                record, spec=dataclasses.replace(record.spec, argv=argv or record.spec.argv)),
                durable=False)   # only what it runs, for display: not worth an fsync
            return self._info(entry.record)

    def adopt(self, pid: int, *, name: str = "", owner_uid: int = 0) -> ContainerInfo:
        """Make a restored host process (our child now: we are a subreaper) a
        container of its own: a cgroup to freeze and kill it, a record, and
        its exit status recorded when it ends."""
        began = time.monotonic()
        cid = secrets.token_hex(ID_BYTES)
        if name and (not NAME_RE.fullmatch(name) or self._name_taken(name)):
            name = ""
        name = name or cid
        freezer = self._freezer
        cgroup = self.cgroup_root_path / cid
        cdir = container_dir(self.state_dir, cid)
        with self._registry.reserving(name, cid), contextlib.ExitStack() as undo:
            self._make_home(undo, cdir, freezer, cgroup)
            with kernel_call("moving the restored processes into their cgroup", pid=pid):
                _move_tree(freezer.join_file(cgroup), pid)
            with kernel_call("reading the restored process", pid=pid):
                start = process.start_time(pid)
                argv = tuple(procfs.read_cmdline(pid)) or (f"pid {pid}",)
            spec = RunSpec(argv=argv, name=name)
            record = Record(id=cid, name=name, spec=spec, hostname="", backend=freezer.name,
                            cgroup_path=str(cgroup), started_at=time.time(),
                            owner_uid=owner_uid, init_pid=pid, init_start_time=start,
                            notes=("restored into the host PID namespace",))
            self._save(record)
            self._reaper.watch_adopted(pid, start, lambda st: save_exit_status(cdir, st),
                                       lambda p: cgroupfs.cgroup_of(p, freezer) == cgroup)
            self._registry.add(Entry(record))
            undo.pop_all()
        log.info("process_adopted", container=cid, pid=pid, ms=_ms_since(began))
        return self._info(record)

    def _make_home(self, undo: contextlib.ExitStack, cdir: ContainerDir, freezer: Freezer,
                   cgroup: Path) -> None:
        """A new container's directory and cgroup, removed by ``undo``."""
        with kernel_call("creating the container directory"):
            cdir.path.mkdir(mode=0o700)
        undo.callback(shutil.rmtree, cdir.path, ignore_errors=True)
        with kernel_call("creating the container cgroup"):
            # Recreated if someone removed our (empty) root meanwhile.
            self.cgroup_root_path.mkdir(parents=True, exist_ok=True)
            freezer.create(cgroup)
        undo.callback(self._discard_cgroup, freezer, cgroup)

    def _name_taken(self, name: str) -> bool:
        try:
            self._registry.resolve(name)
        except NotFoundError:
            return False
        return True

    def freeze(self, ref: str, timeout: float = 10.0) -> ContainerInfo:
        with self._locked(ref) as entry:
            record = entry.record
            if self._require_running(record, "frozen") == State.FROZEN:
                raise StateError(f"container {record.id} is already frozen")
            began = time.monotonic()
            # Saved first: a daemon crash mid-freeze must not look like a
            # freeze done by someone else.
            self._update(entry, dataclasses.replace(record, frozen_by_daemon=True))
            try:
                with kernel_call("freezing the container"):
                    try:
                        self._backend(record).freeze(Path(record.cgroup_path), timeout)
                    except TimeoutError:
                        raise TimeoutError_(
                            f"container {record.id} did not freeze within {timeout:g} s "
                            "(a task may be stuck in uninterruptible sleep); it was thawed back"
                        ) from None
            except BaseException:
                self._update(entry, dataclasses.replace(entry.record, frozen_by_daemon=False))
                raise
            log.info("container_frozen", container=record.id, ms=_ms_since(began))
            return self._info(entry.record)

    def thaw(self, ref: str, timeout: float = 10.0) -> ContainerInfo:
        with self._locked(ref) as entry:
            record = entry.record
            if self._require_running(record, "thawed") != State.FROZEN:
                raise StateError(f"container {record.id} is not frozen")
            began = time.monotonic()
            with kernel_call("thawing the container"):
                try:
                    self._backend(record).thaw(Path(record.cgroup_path), timeout)
                except TimeoutError:
                    raise TimeoutError_(
                        f"container {record.id} did not thaw within {timeout:g} s") from None
            self._update(entry, dataclasses.replace(record, frozen_by_daemon=False))
            log.info("container_thawed", container=record.id, ms=_ms_since(began))
            return self._info(entry.record)

    def kill(self, ref: str, signal: int = SIGTERM, timeout: float = 0.0) -> ContainerInfo:
        """Send ``signal`` to the init; with ``timeout`` > 0, SIGKILL everything
        still there after that long. SIGKILL always waits for the end."""
        try:
            sig = Signals(signal)
        except ValueError:
            raise UsageError(f"unknown signal {signal}") from None
        if timeout < 0:
            raise UsageError(f"timeout must not be negative: {timeout}")
        with self._locked(ref) as entry:
            record = entry.record
            observed = self._observe(record)
            if observed.state in _ENDED:
                raise StateError(f"container {record.id} is not running "
                                 f"(it is {observed.state.value})")
            if timeout == 0 and self._drops(record, sig):
                raise StateError(
                    f"the init of container {record.id} has no handler for {sig.name}, and the "
                    "kernel drops such signals to the init of a PID namespace: nothing would "
                    f"happen. Give a timeout to send SIGKILL after it (ckptctl kill --timeout "
                    "SECONDS), or send SIGKILL")
            try:
                with process.pidfd(record.init_pid, record.init_start_time) as fd:
                    self._signal_init(record, fd, sig)
                    if sig == SIGKILL or (timeout > 0 and not process.wait_exit(fd, timeout)):
                        self._kill_all(record, fd)
                    ended = process.wait_exit(fd, 0)
            except ProcessLookupError:
                ended = True   # it exited on its own meanwhile: nothing left to signal
            if ended:
                status.wait_for_shim(record, status.EXIT_STATUS_GRACE, self._cdir(record))
                if record.frozen_by_daemon:
                    self._update(entry, dataclasses.replace(record, frozen_by_daemon=False))
            return self._info(entry.record)

    def delete(self, ref: str, force: bool = False) -> None:
        with self._locked(ref) as entry:
            record = entry.record
            freezer = self._backend(record)
            path = Path(record.cgroup_path)
            observed = self._observe(record)
            if observed.state not in _ENDED:
                if not force:
                    raise StateError(
                        f"container {record.id} is running; kill it first or use force")
                try:
                    with process.pidfd(record.init_pid, record.init_start_time) as fd:
                        self._kill_all(record, fd)
                except ProcessLookupError:
                    pass   # exited meanwhile: what is left in the cgroup goes below
            left = _tasks(freezer, path)
            if left:
                if not force:
                    raise StateError(f"container {record.id} has ended but {len(left)} "
                                     "processes remain in its cgroup; use force")
                self._kill_all(record, None)
            # The shim writes exit.json into the directory we are about to remove.
            status.wait_for_shim(record, status.EXIT_STATUS_GRACE, self._cdir(record))
            with kernel_call("removing the container cgroup"):
                freezer.remove(path, CGROUP_REMOVE_WAIT)
            with kernel_call("removing the container directory"):
                shutil.rmtree(self._cdir(record).path)
            self._registry.remove(entry)
            log.info("container_deleted", container=record.id, name=record.name)

    def close(self) -> None:
        """Stop background threads. Containers keep running."""
        self._shims.close()
        self._reaper.close()

    # --- helpers ---------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, ref: str) -> Iterator[Entry]:
        entry = self._registry.resolve(ref)
        with entry.lock, errors.context(container=entry.record.id):
            if entry.deleted:
                raise NotFoundError(f"no container {ref!r}")
            yield entry

    def _backend(self, record: Record) -> Freezer:
        with self._lock:
            backend = self._backends.get(record.backend)
            if backend is None:
                with kernel_call("choosing the freezer backend", container=record.id):
                    backend = make_freezer(record.backend, self._v1_mount, self._v2_mount)
                self._backends[record.backend] = backend
            return backend

    def _cdir(self, record: Record) -> ContainerDir:
        return container_dir(self.state_dir, record.id)

    def _save(self, record: Record, *, durable: bool = True) -> None:
        with kernel_call("saving the container record", container=record.id):
            save_record(self._cdir(record), record, durable=durable)

    def _update(self, entry: Entry, record: Record, *, durable: bool = True) -> None:
        self._save(record, durable=durable)
        entry.record = record

    def _observe(self, record: Record) -> status.Observed:
        return status.observe(record, self._cdir(record), self._backend(record))

    def _describe(self, record: Record, observed: status.Observed) -> ContainerInfo:
        return status.describe(record, observed, self._backend(record))

    def _info(self, record: Record) -> ContainerInfo:
        return self._describe(record, self._observe(record))

    def _require_running(self, record: Record, verb: str) -> State:
        """The container's state, running or frozen; ended is refused."""
        state = self._observe(record).state
        if state in _ENDED:
            raise StateError(f"container {record.id} is {state.value}; "
                             f"only a running container can be {verb}")
        return state

    def _drops(self, record: Record, sig: Signals) -> bool:
        try:
            return process.drops_signal(record.init_pid, sig)
        except (ProcessLookupError, FileNotFoundError, KeyError):
            return False   # gone meanwhile: the kill finds out and says so

    def _signal_init(self, record: Record, fd: int, sig: Signals) -> None:
        with kernel_call(f"sending {sig.name} to the container's init"):
            process.send_signal(fd, sig)
        log.info("container_signalled", container=record.id, signal=sig.name)
        if sig in (SIGKILL, SIGSTOP):
            return
        try:
            caught = process.caught_signals(record.init_pid)
        except ProcessLookupError:
            return
        if sig not in caught:
            # The kernel drops signals that a PID namespace's init has no
            # handler for, even from the host: worth a line in the log.
            log.warning("signal_ignored_by_init", container=record.id, signal=sig.name)

    def _kill_all(self, record: Record, init_fd: int | None) -> None:
        """SIGKILL every task of the container and wait until all are gone
        (and the init has been reaped by its shim, if we hold its pidfd)."""
        freezer = self._backend(record)
        path = Path(record.cgroup_path)
        deadline = time.monotonic() + KILL_WAIT
        if init_fd is not None:
            try:
                # The init's death takes its whole PID namespace with it.
                process.send_signal(init_fd, SIGKILL)
            except ProcessLookupError:
                pass
        with kernel_call("killing the container's tasks"):
            while True:
                freezer.kill_all(path)   # v1: also thaws, frozen v1 tasks die only then
                try:
                    freezer.wait_empty(path, max(0.0, min(KILL_ROUND, deadline - time.monotonic())))
                    break
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError_(
                            f"container {record.id} still has tasks {KILL_WAIT:g} s after "
                            "SIGKILL (stuck in uninterruptible sleep?)") from None
        if init_fd is not None and not process.wait_exit(init_fd, deadline - time.monotonic()):
            raise TimeoutError_(f"the init of container {record.id} did not exit "
                                f"within {KILL_WAIT:g} s of SIGKILL")
        log.info("container_killed", container=record.id)

    def _shim_config(self, record: Record, freezer: Freezer, starter: str) -> ShimConfig:
        spec = record.spec
        return ShimConfig(
            container_id=record.id,
            container_dir=str(self._cdir(record).path),
            argv=spec.argv,
            env=_environment(spec),
            cwd=spec.cwd,
            hostname=record.hostname,
            new_net=spec.network == Network.NEW,
            tty=spec.tty,
            uid=spec.uid,
            gid=spec.gid,
            cgroup_join_file=str(freezer.join_file(Path(record.cgroup_path))),
            cgroup2_dir=record.cgroup_path if freezer.name == "cgroup2" else "",
            starter=starter,
            domainname=record.domainname,
        )

    def _abandon_shim(self, started: launch.Started, freezer: Freezer, cgroup: Path) -> None:
        """Undo of a started container when run() fails after the shim reported."""
        _kill_quietly(freezer, cgroup)
        started.shim.wait(KILL_WAIT)

    def _discard_cgroup(self, freezer: Freezer, cgroup: Path) -> None:
        _kill_quietly(freezer, cgroup)
        try:
            freezer.remove(cgroup, CGROUP_REMOVE_WAIT)
        except OSError as e:
            # We are already failing with the error that matters; say it and go on.
            log.warning("cgroup_not_removed", cgroup=str(cgroup), error=str(e))


def _kill_quietly(freezer: Freezer, cgroup: Path) -> None:
    try:
        if freezer.procs(cgroup):
            freezer.kill_all(cgroup)
            freezer.wait_empty(cgroup, KILL_WAIT)
    except OSError as e:
        log.warning("cgroup_not_emptied", cgroup=str(cgroup), error=str(e))


def _tasks(freezer: Freezer, path: Path) -> list[int]:
    try:
        return freezer.procs(path)
    except FileNotFoundError:
        return []


def _check_spec(spec: RunSpec) -> None:
    if not spec.argv or not spec.argv[0]:
        raise UsageError("argv must name a command")
    if spec.name and not NAME_RE.fullmatch(spec.name):
        raise UsageError(f"bad container name {spec.name!r}: use up to 63 letters, digits, "
                         "'_', '.', '-', starting with a letter or digit")
    if len(spec.hostname.encode()) > HOSTNAME_MAX or "\0" in spec.hostname:
        raise UsageError(f"bad hostname {spec.hostname!r}: at most {HOSTNAME_MAX} bytes")
    if not spec.cwd.startswith("/"):
        raise UsageError(f"cwd must be an absolute path: {spec.cwd!r}")
    for item in spec.env:
        if "=" not in item[1:]:
            raise UsageError(f"env entries must be KEY=VALUE: {item!r}")
    if spec.uid < 0 or spec.gid < 0:
        raise UsageError(f"bad uid/gid {spec.uid}/{spec.gid}")
    if not isinstance(spec.network, Network):
        raise UsageError(f"bad network mode {spec.network!r}")


def _environment(spec: RunSpec) -> tuple[str, ...]:
    """The defaults (PATH, HOME, TERM with a tty), overridden by spec.env."""
    env = {"PATH": DEFAULT_PATH, "HOME": _home(spec.uid)}
    if spec.tty:
        env["TERM"] = DEFAULT_TERM
    for item in spec.env:
        key, _, value = item.partition("=")
        env[key] = value
    return tuple(f"{k}={v}" for k, v in env.items())


def _home(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return "/"   # a uid without a passwd entry (e.g. from another host)


def _ms_since(began: float) -> float:
    return round((time.monotonic() - began) * 1000, 1)


def _move_tree(procs_file: Path, root: int) -> None:
    """Every process of the tree under ``root`` into a cgroup, parents
    first: a child forked after its parent moved is born there, one forked
    before shows in the parent's children read after the move."""
    todo = [root]
    while todo:
        pid = todo.pop(0)
        try:
            cgroupfs.write_control(procs_file, str(pid))
            todo += proctask.read_children(pid)
        except (ProcessLookupError, FileNotFoundError):
            if pid == root:
                raise
            # exited meanwhile (a zombie cannot move either): nothing to hold
