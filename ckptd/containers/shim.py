"""The per-container shim, run by the daemon as ``python -m ckptd.containers.shim``.

Like containerd-shim, one shim per container outlives the daemon, so a daemon
restart leaves containers running. The shim

1. reads its ``ShimConfig`` (one JSON document) on stdin;
2. unshares CLONE_NEWPID, so its next child is PID 1 of a new PID namespace,
   and forks that child, the container's init;
3. in the init: ``enter_container`` (cgroup, namespaces, /proc, hostname,
   loopback), then a *starter* makes the init what it should be.
   ``exec_command`` execs the command; the restore engine will pass its own
   starter that builds a restored process tree in its place;
4. reports one JSON line on stdout, ``{"init_pid": ..., "init_start_time": ...}``
   or ``{"error": ..., "kind": "usage" | "system"}`` if the init failed before
   or at exec (found through a close-on-exec pipe);
5. copies pty output to the log (with a tty), waits for the init, writes
   exit.json and exits.

The shim itself stays in the host's namespaces and outside the container's
cgroup (only its pid_for_children namespace changes): it is not a container
task and is never frozen. It imports nothing heavy, as it starts with every
container.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import select
import signal
import struct
import sys
import termios
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

from ckptd.containers.records import ContainerDir, ExitStatus, save_exit_status
from ckptd.kernel import cgroupfs, netdev, process
from ckptd.kernel.namespaces import (
    Namespace, make_mounts_private, mount_proc, set_domainname, set_hostname, unshare,
)

TTY_ROWS, TTY_COLS = 24, 80   # a pty starts 0x0, which confuses full-screen programs
COPY_CHUNK = 65536


@dataclass(frozen=True)
class ShimConfig:
    """Everything the shim needs, resolved by the daemon (env, hostname, paths)."""

    container_id: str
    container_dir: str
    argv: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    hostname: str
    new_net: bool
    tty: bool
    uid: int
    gid: int
    cgroup_join_file: str     # the init writes "0" here to move itself in
    starter: str = "exec"     # "exec": run argv; "stub": become the restore stub
    domainname: str = ""      # set in the new UTS namespace when not empty
    shim_log: str = ""        # the shim's stderr from reading its config on
    cgroup2_dir: str = ""     # a cgroup2 directory: the init is born in it (no join)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShimConfig:
        data = json.loads(text)
        data["argv"] = tuple(data["argv"])
        data["env"] = tuple(data["env"])
        return cls(**data)


@dataclass(frozen=True)
class InitStdio:
    """File descriptors the shim opened for the init."""

    log_fd: int                # the container log, O_APPEND
    tty_slave: int | None      # the pty slave with a tty, else None


class InitError(Exception):
    """The init could not start; ``kind`` "usage" is the caller's mistake."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class InitStarter(Protocol):
    def __call__(self, cfg: ShimConfig, stdio: InitStdio) -> NoReturn:
        """Runs in the init after enter_container; execs or raises."""


def enter_container(cfg: ShimConfig, *, in_cgroup: bool = False) -> None:
    """Make the calling process (the new PID namespace's init) the container:
    its cgroup first (unless it was born there), so everything after is
    accounted and freezable, then its own namespaces and the mounts and names
    that go with them."""
    if not in_cgroup:
        cgroupfs.write_control(Path(cfg.cgroup_join_file), "0")
    spaces = [Namespace.UTS, Namespace.IPC, Namespace.MNT]
    if cfg.new_net:
        spaces.append(Namespace.NET)
    unshare(*spaces)
    make_mounts_private()
    mount_proc()
    set_hostname(cfg.hostname)
    if cfg.domainname:
        set_domainname(cfg.domainname)
    if cfg.new_net:
        netdev.set_link_up("lo")


def exec_command(cfg: ShimConfig, stdio: InitStdio) -> NoReturn:
    attach_stdio(stdio)
    reset_signals()
    drop_privileges(cfg.uid, cfg.gid)
    try:
        os.chdir(cfg.cwd)   # after dropping privileges: the user must be able to enter it
    except (FileNotFoundError, NotADirectoryError):
        raise InitError("usage", f"cwd does not exist: {cfg.cwd}") from None
    except PermissionError:
        raise InitError("usage", f"cwd not accessible to uid {cfg.uid}: {cfg.cwd}") from None
    env = dict(item.split("=", 1) for item in cfg.env)
    command = cfg.argv[0]
    try:
        os.execvpe(command, list(cfg.argv), env)
    except FileNotFoundError:
        raise InitError("usage", f"command not found: {command}") from None
    except PermissionError:
        raise InitError("usage", f"permission denied: {command}") from None
    except OSError as e:
        if e.errno == errno.ENOEXEC:
            raise InitError("usage", f"not an executable: {command}") from None
        raise


def exec_stub(cfg: ShimConfig, stdio: InitStdio) -> NoReturn:
    """Become the restore engine's stub (argv[0]): a freestanding program
    that waits to be seized and to have the checkpointed task laid into it.
    Its fds, credentials and signal state all come from the image later."""
    try:
        os.execv(cfg.argv[0], list(cfg.argv))
    except OSError as e:
        raise InitError("system", f"cannot start the restore stub {cfg.argv[0]}: {e}") from None


STARTERS = {"exec": exec_command, "stub": exec_stub}


def attach_stdio(stdio: InitStdio) -> None:
    # Its own session: the init leads it, and a pty becomes its controlling
    # terminal (only a session leader without one can take it).
    os.setsid()
    if stdio.tty_slave is not None:
        fcntl.ioctl(stdio.tty_slave, termios.TIOCSCTTY, 0)
        fds = (stdio.tty_slave,) * 3
    else:
        fds = (os.open(os.devnull, os.O_RDONLY), stdio.log_fd, stdio.log_fd)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)


def reset_signals() -> None:
    # Dispositions set to "ignore" survive exec: Python ignores SIGPIPE and
    # SIGXFSZ, and the command must start with the defaults.
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # signals reserved by libc (e.g. 32, 33) cannot be changed; they are fine
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def drop_privileges(uid: int, gid: int) -> None:
    if uid == 0 and gid == 0:
        return
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)


def run_shim(cfg: ShimConfig, report_fd: int, starter: InitStarter = exec_command) -> int:
    cdir = ContainerDir(Path(cfg.container_dir))
    log_fd = os.open(cdir.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    master = slave = None
    if cfg.tty:
        master, slave = os.openpty()   # both close-on-exec, slave opened O_NOCTTY
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", TTY_ROWS, TTY_COLS, 0, 0))
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    unshare(Namespace.PID)
    pid, in_cgroup = _fork_init(cfg)
    if pid == 0:
        if master is not None:
            os.close(master)
        _init_child(cfg, InitStdio(log_fd, slave), err_w, starter, in_cgroup)
    os.close(err_w)
    if slave is not None:
        os.close(slave)
    failure = _read_all(err_r)
    os.close(err_r)
    if failure:
        os.waitpid(pid, 0)
        _report(report_fd, json.loads(failure))
        return 1
    if not _report(report_fd, {"init_pid": pid, "init_start_time": process.start_time(pid)}):
        # The daemon is gone before learning of this container: nobody could
        # ever manage it, so do not leave it running.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return 1
    status = _wait_init(pid, master, log_fd)
    try:
        save_exit_status(cdir, ExitStatus.from_wait_status(status))
    except FileNotFoundError:
        pass  # the container was force-deleted while we waited: nobody to tell
    return 0


def _fork_init(cfg: ShimConfig) -> tuple[int, bool]:
    """Fork the init: born in its cgroup2 directory where we can (see
    process.fork_into_cgroup), else forked and joined afterwards."""
    if cfg.cgroup2_dir:
        fd = os.open(cfg.cgroup2_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return process.fork_into_cgroup(fd), True
        except OSError:
            pass   # an older kernel without CLONE_INTO_CGROUP: join below
        finally:
            os.close(fd)
    return os.fork(), False


def _init_child(cfg: ShimConfig, stdio: InitStdio, err_w: int, starter: InitStarter,
                in_cgroup: bool) -> NoReturn:
    payload: dict[str, Any]
    try:
        enter_container(cfg, in_cgroup=in_cgroup)
        starter(cfg, stdio)
        payload = {"kind": "system", "error": "the init starter returned"}
    except InitError as e:
        payload = {"kind": e.kind, "error": e.message}
    except OSError as e:
        payload = {"kind": "system", "error": f"starting the init: {e}"}
    except BaseException as e:  # noqa: BLE001 - whatever it was, the daemon must hear of it
        payload = {"kind": "system", "error": f"starting the init: {type(e).__name__}: {e}"}
    try:
        os.write(err_w, json.dumps(payload).encode())
    finally:
        os._exit(127)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _report(fd: int, data: dict[str, Any]) -> bool:
    try:
        os.write(fd, (json.dumps(data) + "\n").encode())
        return True
    except BrokenPipeError:
        return False
    finally:
        os.close(fd)


def _wait_init(pid: int, master: int | None, log_fd: int) -> int:
    """Wait for the init to exit (copying pty output meanwhile); its wait status."""
    if master is None:
        return os.waitpid(pid, 0)[1]
    os.set_blocking(master, False)
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(master, select.POLLIN)
    copying = True
    exited = False
    while not exited:
        for fd, _ in poller.poll():
            if fd == pidfd:
                exited = True
            elif copying and _copy(master, log_fd) is None:
                poller.unregister(master)
                copying = False
    os.close(pidfd)
    status = os.waitpid(pid, 0)[1]
    # The whole PID namespace is gone now: drain what is left in the pty.
    while copying and _copy(master, log_fd):
        pass  # until empty (0) or closed (None)
    os.close(master)
    return status


def _copy(master: int, log_fd: int) -> int | None:
    """Copy one chunk of pty output: its size, 0 if none is ready, None once
    the pty is closed (EIO: every slave fd is closed)."""
    try:
        data = os.read(master, COPY_CHUNK)
    except BlockingIOError:
        return 0
    except OSError as e:
        if e.errno == errno.EIO:
            return None
        raise
    if not data:
        return None
    view = memoryview(data)
    while view:
        view = view[os.write(log_fd, view):]
    return len(data)


def main() -> int:
    text = sys.stdin.read()
    if not text:
        return 0   # a spare shim whose daemon went away: nothing to run
    cfg = ShimConfig.from_json(text)
    if cfg.shim_log:
        # Started ahead of time with the daemon's stderr: from here on its
        # messages belong to this container's post-mortem log.
        err = os.open(cfg.shim_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.dup2(err, 2)
        os.close(err)
    devnull = os.open(os.devnull, os.O_RDWR)
    report_fd = os.dup(1)       # close-on-exec: the init must not hold the daemon's pipe
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    return run_shim(cfg, report_fd, STARTERS[cfg.starter])


if __name__ == "__main__":
    sys.exit(main())
