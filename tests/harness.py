"""A real ckptd for tests: one daemon process in its own socket, state dir and
cgroup root, with the teardown that removes everything it made.

Used by the fixtures in tests/integration/conftest.py.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CGROUP_MOUNTS = (Path("/sys/fs/cgroup/freezer"), Path("/sys/fs/cgroup/unified"))
START_TIMEOUT = 20.0   # seconds; a cold Python start plus recovery takes ~1 s
STOP_TIMEOUT = 15.0
# A shim exits right after writing its container's exit status, the fork
# server once its last worker is gone: give them a moment before calling
# them left behind.
LEFTOVER_WAIT = 5.0


def wait_for(predicate, timeout: float = 5.0, what: str = "a condition", interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


class Daemon:
    """One ckptd process and the paths it owns."""

    def __init__(self, root: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.socket = root / "ckptd.sock"
        self.state_dir = root / "state"
        self.cgroup_root = f"ckptd-test-{secrets.token_hex(4)}"
        self.log_path = root / "daemon.log"
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        # Where the daemon runs and with what environment (None: ours).
        self.cwd: Path | None = None
        self.env: dict[str, str] | None = None

    @property
    def address(self) -> str:
        return str(self.socket)

    def args(self) -> list[str]:
        return [sys.executable, "-m", "ckptd.server.main", "--socket", str(self.socket),
                "--state-dir", str(self.state_dir), "--cgroup-root", self.cgroup_root,
                "--log-format", "json", "--log-level", "debug", *self.extra_args]

    def start(self) -> None:
        from ckptd_client import Client
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.cwd, env=self.env)
        log.close()

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"ckptd exited with {self.proc.returncode}:\n{self.log()}")
            if not self.socket.exists():
                return False
            try:
                with Client(self.address, timeout=2) as c:
                    return c.health()
            except Exception:
                return False
        wait_for(healthy, START_TIMEOUT, "ckptd to serve")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"ckptd did not stop on SIGTERM:\n{self.log()}")

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, **kw):
        from ckptd_client import Client
        return Client(self.address, **kw)

    def ckptctl(self, *args: str, input: bytes | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
        exe = shutil.which("ckptctl")
        cmd = [exe] if exe else [sys.executable, "-m", "ckptd_client.cli"]
        return subprocess.run([*cmd, "--address", self.address, *args], input=input,
                              capture_output=True, timeout=timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return "(no daemon log)"

    def events(self, name: str) -> list[dict]:
        """The daemon's JSON log events called ``name``, oldest first."""
        found = []
        for line in self.log_path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                found.append(event)
        return found

    def cgroup_dirs(self) -> list[Path]:
        return [m / self.cgroup_root for m in CGROUP_MOUNTS if (m / self.cgroup_root).exists()]

    def cleanup(self) -> list[str]:
        """Remove everything this daemon made; return what had to be forced."""
        problems: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            try:
                with self.client(timeout=10) as c:
                    for ctr in c.list():
                        try:
                            c.delete(ctr.id, force=True)
                        except Exception as e:
                            problems.append(f"delete {ctr.id} failed: {e}")
            except Exception as e:
                problems.append(f"listing containers failed: {e}")
            try:
                self.stop()
            except AssertionError as e:
                problems.append(str(e))
        # Whatever the API could not remove: kill by pid from the cgroups, then rmdir.
        for top in self.cgroup_dirs():
            for leaf in sorted(top.rglob("*"), key=lambda p: -len(p.parts)):
                if leaf.is_dir():
                    _kill_cgroup(leaf, problems)
                    _rmdir(leaf, problems)
            _kill_cgroup(top, problems)
            _rmdir(top, problems)
        # Shims, workers and the fork server live outside the containers'
        # cgroups; any that outlived the cleanup still holds a file of ours
        # (a container log, the daemon's log as its stderr).
        try:
            wait_for(lambda: not holders(self.root), LEFTOVER_WAIT, "the daemon's helpers to exit")
        except AssertionError:
            for pid, path in sorted(holders(self.root).items()):
                problems.append(f"process {pid} ({_comm(pid)}) left behind, holding {path}")
                kill_and_reap(pid)
        if self.socket.exists():
            problems.append(f"socket {self.socket} left behind")
        return problems


def holders(root: Path) -> dict[int, str]:
    """Processes other than us with a file under ``root`` open (or as cwd):
    pid -> one such path."""
    found: dict[int, str] = {}
    prefix = str(root) + "/"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            links = [os.readlink(f"/proc/{entry.name}/cwd")]
            links += [os.readlink(f"/proc/{entry.name}/fd/{fd}")
                      for fd in os.listdir(f"/proc/{entry.name}/fd")]
        except OSError:
            continue   # exited meanwhile, or a kernel thread
        held = next((link for link in links
                     if link == str(root) or link.startswith(prefix)), None)
        if held is not None:
            found[int(entry.name)] = held
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def _kill_cgroup(path: Path, problems: list[str]) -> None:
    procs = path / "cgroup.procs"
    if not procs.exists():
        return
    for state in (path / "freezer.state", path / "cgroup.freeze"):
        if state.exists():
            state.write_text("THAWED" if state.name == "freezer.state" else "0")
    pids = [int(p) for p in procs.read_text().split()]
    if pids:
        problems.append(f"processes {pids} left in {path}")
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not procs.read_text().split(), 10, f"{path} to empty")


def _rmdir(path: Path, problems: list[str]) -> None:
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)  # a dying task can keep a cgroup busy for a moment
    problems.append(f"cgroup {path} could not be removed")


# What legitimately differs in a task's outside view after a restore into a
# fresh task (see workloads.compare_views).
RESTORE_VIEW_IGNORE = ("stat.*", "status.SigQ", "status.voluntary*", "status.nonvoluntary*")


def kill_and_reap(pid: int) -> None:
    """SIGKILL pid and reap it if it is our child; gone already is fine."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass   # not ours, or already reaped


def tree_pids(root: int) -> list[int]:
    """``root`` and every process under it (children of any of its threads),
    breadth first."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                todo += [int(c) for c in f.read().split()]
    return out


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Wait until none of ``pids`` exists any more (a dumped tree is gone)."""
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{p}") for p in pids):
        assert time.monotonic() < deadline, f"pids {pids} did not go away"
        time.sleep(0.01)
