"""``python -m ckptd.engine.forkserver``: forks engine workers from a warm process.

Starting an engine worker from scratch costs ~135 ms of CPU (interpreter,
then imports), more than a checkpoint of a small process. The fork server
pays that once: it imports what ``python -m ckptd.engine.worker`` imports,
then forks a child per request (a few ms) that runs ``worker.run()``.

Protocol, on a SOCK_SEQPACKET socket whose fd is in $CKPTD_FORKSERVER_FD,
one JSON object per packet:

- server -> daemon, once its imports are done: ``{"ready": PID}``
- ``{"op": "fork", "env": {...}, "cwd": str, "affinity": [cpu...],
  "umask": int}`` with four fds attached (SCM_RIGHTS): the worker's control
  socket, stdin, stdout, stderr -> ``{"pid": N}``
- ``{"op": "reap", "pid": N}`` -> ``{"pid": N, "returncode": C}`` (C as
  subprocess's: negative for a signal). Only a child of ours that has exited
  is reaped, and only when asked: the daemon holds a pidfd on it by then, so
  a pid is never reused under it.
- anything else -> ``{"error": "..."}``; the server carries on.
- end of file (the daemon closed its end or died): wait for the children
  still running (a checkpoint worker whose daemon is gone resumes its tree
  before exiting), reap them, exit.

The server stays single-threaded (fork of a threaded process is unsafe) and
is not a child subreaper: a host process a restore spawned with its original
pid must reparent to the daemon when its worker exits, as it did before.
The child starts as a fresh worker would: its own session, the fds above as
0-3 and no others, the request's environment, cwd, umask and CPU affinity,
SCHED_OTHER, signal dispositions of a fresh interpreter and an empty mask.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import gc
import json
import os
import signal
import socket
import sys
import threading
from typing import Any

FD_ENV = "CKPTD_FORKSERVER_FD"
CONTROL_FD_ENV = "CKPTD_CONTROL_FD"   # as in ckptd.engine.worker
WORKER_CONTROL_FD = 3                 # where the child finds its control socket
FORK_FDS = 4                          # control, stdin, stdout, stderr
# A request is an environment and a few fields: a few KiB. Larger is refused.
MAX_REQUEST = 1 << 16
MAX_FDS = 8                           # more than a request may carry: to notice and close them
PR_SET_NAME = 15
PR_GET_CHILD_SUBREAPER = 37
# Names in ps/top (comm): a forked worker's command line is still the server's.
SERVER_NAME = b"ckptd-forks"
WORKER_NAME = b"ckptd-worker"
SERVER_MODULE = "ckptd.engine.forkserver"   # as started: python -P -m ...
WORKER_MODULE = "ckptd.engine.worker"
CHILD_FAILED = 127                    # exit status of a child that could not become a worker


class RequestError(Exception):
    """A request we refuse; the answer says why and the server carries on."""


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """The next request and its fds; (None, []) at end of file."""
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    received = list(fds)
    if not data and not received:
        return None, []
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close_all(received)
        raise RequestError("request too large")
    try:
        message = json.loads(data)
    except ValueError:
        _close_all(received)
        raise RequestError("request is not JSON") from None
    if not isinstance(message, dict):
        _close_all(received)
        raise RequestError("request is not a JSON object")
    return message, received


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass   # closed already: nothing to release


def _reply(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(json.dumps(message).encode())


class Server:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.children: set[int] = set()
        # What a fresh interpreter has (Python ignores SIGPIPE and SIGXFSZ,
        # handles SIGINT): a child is reset to this, whatever happened here.
        self.dispositions = {s: signal.getsignal(s) for s in signal.valid_signals()
                             if s not in (signal.SIGKILL, signal.SIGSTOP)}

    def serve(self) -> None:
        _reply(self.sock, {"ready": os.getpid()})
        while True:
            try:
                request, fds = receive(self.sock)
            except RequestError as e:
                _reply(self.sock, {"error": str(e)})
                continue
            if request is None:
                return
            try:
                answer = self.handle(request, fds)
            except RequestError as e:
                answer = {"error": str(e)}
            finally:
                _close_all(fds)   # the child has its copies; we keep none
            _reply(self.sock, answer)

    def handle(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = request.get("op")
        if op == "fork":
            return {"pid": self.fork(request, fds)}
        if fds:
            raise RequestError(f"{op!r} takes no file descriptors")
        if op == "reap":
            return self.reap(request.get("pid"))
        raise RequestError(f"unknown op {op!r}")

    def fork(self, request: dict[str, Any], fds: list[int]) -> int:
        if len(fds) != FORK_FDS:
            raise RequestError(f"fork needs {FORK_FDS} file descriptors "
                               f"(control, stdin, stdout, stderr), got {len(fds)}")
        env, cwd = request.get("env"), request.get("cwd")
        affinity, umask = request.get("affinity"), request.get("umask")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in env.items()):
            raise RequestError("env must map names to strings")
        if not isinstance(cwd, str) or not cwd.startswith("/"):
            raise RequestError(f"bad cwd {cwd!r}")
        if (not isinstance(affinity, list) or not affinity
                or not all(isinstance(c, int) and c >= 0 for c in affinity)):
            raise RequestError(f"bad affinity {affinity!r}")
        if not isinstance(umask, int) or not 0 <= umask <= 0o777:
            raise RequestError(f"bad umask {umask!r}")
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1 or threading.active_count() != 1:
            raise RequestError(f"the fork server has {threads} threads; it forks only "
                               "when single-threaded")
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._become_worker(env, cwd, affinity, umask, fds)   # never returns
        self.children.add(pid)
        return pid

    def _become_worker(self, env: dict[str, str], cwd: str, affinity: list[int],
                       umask: int, fds: list[int]) -> None:
        try:
            # Our socket is closed below with every other fd: no Python object
            # may close that number again once a worker file has it.
            self.sock.detach()
            os.setsid()
            _set_name(WORKER_NAME)
            _set_cmdline_module(SERVER_MODULE, WORKER_MODULE)
            for sig, disposition in self.dispositions.items():
                if disposition is not None and signal.getsignal(sig) != disposition:
                    signal.signal(sig, disposition)
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            os.sched_setaffinity(0, affinity)
            os.umask(umask)
            os.chdir(cwd)
            # Out of the way of 0-3 first, then into place.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, WORKER_CONTROL_FD + 1) for fd in fds]
            control, stdin, stdout, stderr = high
            for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2),
                               (control, WORKER_CONTROL_FD)):
                os.dup2(fd, target)
            os.closerange(WORKER_CONTROL_FD + 1, os.sysconf("SC_OPEN_MAX"))
            os.environ.clear()
            os.environ.update(env)
            os.environ[CONTROL_FD_ENV] = str(WORKER_CONTROL_FD)
        except BaseException as e:  # noqa: BLE001 - nothing to report to but stderr
            try:
                os.write(2, f"ckptd fork server: a worker could not start: {e}\n".encode())
            finally:
                os._exit(CHILD_FAILED)
        from ckptd.engine import worker
        worker.run()
        os._exit(CHILD_FAILED)   # run() ends in os._exit; this is for a bug in it

    def reap(self, pid: Any) -> dict[str, Any]:
        if not isinstance(pid, int) or pid not in self.children:
            raise RequestError(f"{pid!r} is not a worker of this fork server")
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == 0:
            raise RequestError(f"worker {pid} is still running")
        self.children.discard(pid)
        return {"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}

    def finish(self) -> None:
        """The daemon is gone: wait for our children to end, then exit."""
        for pid in sorted(self.children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass   # reaped already
        self.children.clear()


def _is_subreaper() -> bool:
    value = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0)
    return bool(value.value)


def _set_name(name: bytes) -> None:
    ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def _set_cmdline_module(old: str, new: str) -> None:
    """Make /proc/self/cmdline (what ps shows) name module ``new`` where it
    names ``old``: rewritten in place, in the argument area the kernel reads
    it from (moving that area would need CAP_SYS_RESOURCE), padded with NULs.
    A forked worker then reads like a freshly started one."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])   # proc(5) fields 48, 49: arg_start/end
        with open("/proc/self/cmdline", "rb") as f:
            args = f.read()
    except (OSError, ValueError, IndexError):
        return   # cosmetic: never worth a worker
    text = args.replace(b"\0" + old.encode() + b"\0", b"\0" + new.encode() + b"\0")
    if text == args or len(text) > end - start:
        return   # not started as expected: leave it as it is
    ctypes.memmove(start, text.ljust(end - start, b"\0"), end - start)


def main() -> int:
    sock = socket.socket(fileno=int(os.environ[FD_ENV]))
    del os.environ[FD_ENV]
    # A zombie nobody asked about must stay one until it is asked for, and
    # a grandchild must never be ours to reap.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if _is_subreaper():
        print("ckptd fork server: refusing to run as a child subreaper", file=sys.stderr)
        return 1
    _set_name(SERVER_NAME)
    from ckptd.engine import worker  # noqa: F401 - the import is the point: children share it
    # Keep the collector off what the children inherit: a collection in a
    # child would otherwise write to (copy) every page of the heap.
    gc.freeze()
    server = Server(sock)
    try:
        server.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass   # the daemon is gone
    server.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
