"""Reaps what this daemon must reap, so nothing stays a zombie: the shims it
started and, when a shim dies before its init while the daemon is a child
subreaper, the init the kernel then hands to us.

One thread for all: it polls one pidfd per watched process (readable once the
process has exited) plus a wake-up pipe. It reaps only processes it was told
about, by pid or pidfd, never with ``waitpid(-1)``, which would steal the exit
status of other children of the daemon (engine workers).
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from collections.abc import Callable

import structlog

from ckptd.containers.records import ExitStatus
from ckptd.kernel import process, procfs, proctask

log = structlog.get_logger(__name__)


class ShimReaper:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, Callable[[], None]] = {}   # pidfd -> what to do on exit
        self._shims: dict[int, subprocess.Popen[bytes]] = {}  # pidfd -> shim, for close()
        self._orphans: set[int] = set()     # pids of adopted trees' orphans being watched
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False
        self._thread: threading.Thread | None = None

    def watch(self, shim: subprocess.Popen[bytes], container: str,
              init_pid: int, init_start_time: int) -> None:
        fd = os.pidfd_open(shim.pid)

        def exited() -> None:
            code = shim.wait()
            log.debug("shim_reaped", container=container, shim_pid=shim.pid, returncode=code)
            self._adopt_orphan(container, init_pid, init_start_time)
        self._add(fd, exited, shim)

    def watch_adopted(self, pid: int, start: int,
                      on_status: Callable[[ExitStatus], None],
                      member: Callable[[int], bool] = lambda pid: False) -> None:
        """Reap ``pid``, a child of ours without a shim (a process restored in
        the host PID namespace), and hand its exit status to ``on_status``.
        Its descendants come to us when their parents die (we are a child
        subreaper): those for which ``member`` holds (in its container) are
        reaped as they end."""
        fd = process.open_pidfd(pid, start)

        def exited() -> None:
            try:
                # Look without reaping: exit.json must exist before the pid is
                # gone, or a reader could see neither process nor status.
                result = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                log.warning("adopted_process_not_ours", pid=pid)
                return
            if result is None:
                return
            code = result.si_status if result.si_code == os.CLD_EXITED else None
            sig = None if code is not None else result.si_status
            try:
                on_status(ExitStatus(exit_code=code, exit_signal=sig, exited_at=time.time()))
            finally:
                os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
                self._watch_orphans(member)
        self._add(fd, exited)

    def _watch_orphans(self, member: Callable[[int], bool]) -> None:
        """Our children of a container whose parent has died: reap each when
        it ends, and look again then (its own children come to us)."""
        try:
            ours = proctask.read_children(os.getpid())
        except OSError:
            return
        with self._lock:
            watched = set(self._orphans)
        for pid in ours:
            if pid in watched or not member(pid):
                continue
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue

            def exited(pid: int = pid, fd: int = fd) -> None:
                try:
                    os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
                except ChildProcessError:
                    pass   # not ours after all
                with self._lock:
                    self._orphans.discard(pid)
                self._watch_orphans(member)
            with self._lock:
                self._orphans.add(pid)
            try:
                self._add(fd, exited)
            except RuntimeError:
                return   # closing: whoever adopts us reaps them

    def close(self) -> None:
        """Stop the thread. Shims keep running; those still alive are no longer
        reaped by us (after the daemon exits, by whoever adopts them)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._wake()
        if thread is not None:
            thread.join()
        with self._lock:
            for shim in self._shims.values():
                shim.poll()   # reap a shim that exited just before we stopped
            for fd in self._watched:
                os.close(fd)
            self._watched.clear()
            self._shims.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _add(self, fd: int, on_exit: Callable[[], None],
             shim: subprocess.Popen[bytes] | None = None) -> None:
        with self._lock:
            if self._closed:
                os.close(fd)
                raise RuntimeError("shim reaper is closed")
            self._watched[fd] = on_exit
            if shim is not None:
                self._shims[fd] = shim
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ckptd-reaper",
                                                daemon=True)
                self._thread.start()
        self._wake()

    def _adopt_orphan(self, container: str, pid: int, start: int) -> None:
        """The shim is gone; if its init lives on as our child (we are a child
        subreaper), reap the init when it exits."""
        try:
            fd = process.open_pidfd(pid, start)
        except ProcessLookupError:
            return
        try:
            ours = procfs.read_stat(pid).ppid == os.getpid()
        except ProcessLookupError:
            ours = False
        if not ours:
            os.close(fd)   # PID 1 or another subreaper has it
            return
        log.warning("container_init_adopted", container=container, pid=pid)

        def exited() -> None:
            try:
                # By pidfd: exactly this process, even if its pid were reused.
                os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                pass   # reaped elsewhere after all: nothing left to do
        self._add(fd, exited)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # a wake-up is already pending, which is all we need

    def _run(self) -> None:
        while True:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            with self._lock:
                if self._closed:
                    return
                for fd in self._watched:
                    poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    self._drain_wake()
                    continue
                with self._lock:
                    on_exit = self._watched.pop(fd)
                    self._shims.pop(fd, None)
                try:
                    on_exit()
                except Exception:  # noqa: BLE001 - one failure must not stop all reaping
                    log.exception("reaper_failed", pidfd=fd)
                finally:
                    os.close(fd)

    def _drain_wake(self) -> None:
        while True:
            try:
                os.read(self._wake_r, 512)
            except BlockingIOError:
                return
