"""Build and run the self-checking workload programs in tests/workloads/.

Each workload sets up some state, prints READY and then writes DIR/ready, waits until
DIR/go exists (this is where a test checkpoints, kills and restores it), then
verifies everything and writes DIR/result: ``PASS`` or ``FAIL: reason`` lines
(wl.h has the protocol, each source file says what it checks). A typical c/r test:

    with Workload.start("files", tmp_path) as w:
        info = w.wait_ready()              # {"pid": "1234", "cwd": ..., ...}
        before = outside_view(w.pid)
        ...checkpoint (the engine kills it)...
        w.reap()                           # our child is dead: free its pid
        ...restore (same pid, no longer our child)...
        assert compare_views(before, outside_view(w.pid)) == []
        w.go()
        assert w.result() == "PASS"

``WL_SABOTAGE=1`` in a workload's environment makes it break one piece of its own
state after go, to prove its checks can fail (``start(..., env={...})``).

Owns: the workload table (name -> source, flags), ``build`` (gcc, cached in
$CKPTD_WORKLOADS_DIR or /tmp, in ckptd-workloads-<uid>-<hash>/ by the hash of the
sources and flags), ``Workload``
(spawn, protocol, cleanup) and ``outside_view``/``compare_views`` (what the
kernel shows of a process from outside, for before/after comparison).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CFLAGS = ("-O1", "-g", "-Wall")
READY_TIMEOUT = 30.0    # seconds; mem1g's default 1 GiB takes ~1.5 s to fill
RESULT_TIMEOUT = 30.0   # timers.c spins up to 2 s; leave room for a slow restore
POLL = 0.01             # seconds; the workloads' own grain


class WorkloadError(Exception):
    """A workload could not be built or broke the protocol (not a FAIL verdict)."""


@dataclass(frozen=True)
class Spec:
    source: str
    cflags: tuple[str, ...] = ()

    @property
    def is_python(self) -> bool:
        return self.source.endswith(".py")


WORKLOADS: dict[str, Spec] = {
    "regs": Spec("regs.c"),
    "regs_static": Spec("regs.c", ("-static",)),
    "memory": Spec("memory.c"),
    "files": Spec("files.c"),
    "signals": Spec("signals.c"),
    "timers": Spec("timers.c"),
    "limits_creds": Spec("limits_creds.c"),
    "seccomp_rseq": Spec("seccomp_rseq.c"),
    "socket_holder": Spec("socket_holder.c"),
    "mem1g": Spec("mem1g.c"),
    "counter": Spec("counter.py"),
    "threads": Spec("threads.c", ("-pthread",)),
    "pythreads": Spec("pythreads.py"),
    "tree": Spec("tree.c"),
    "fanout": Spec("fanout.c"),
    "zombie": Spec("zombie.c"),
    "clone_flags": Spec("clone_flags.c"),
    "vfork": Spec("vfork.c"),
    "sharing": Spec("sharing.c"),
}


def spec_of(name: str) -> Spec:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise WorkloadError(f"no workload {name!r}; known: {', '.join(sorted(WORKLOADS))}") from None


# -- building ------------------------------------------------------------------

@functools.cache
def _gcc() -> tuple[str, str]:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise WorkloadError("gcc not found: the workloads are C programs built at test time "
                            "(apt-get install gcc libc6-dev)")
    version = subprocess.run([gcc, "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
    return gcc, version


# Where the built workloads go: a test session sets its own, removed at its
# end (tests/conftest.py); benchmarks and ad-hoc use share the temp dir.
DIR_ENV = "CKPTD_WORKLOADS_DIR"


def _cache_dir(key: str) -> Path:
    # Per uid: a directory made by root is no use to a test run by someone else.
    base = os.environ.get(DIR_ENV) or tempfile.gettempdir()
    path = Path(base) / f"ckptd-workloads-{os.geteuid()}-{key}"
    path.mkdir(mode=0o755, exist_ok=True)
    st = path.stat()
    # /tmp is shared: never run binaries from a directory someone else controls.
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise WorkloadError(f"{path} is not ours alone (uid {st.st_uid}, mode {st.st_mode:o}); remove it")
    os.chmod(path, 0o755)   # other uids run workloads too (Workload.start(uid=...))
    return path


@functools.cache
def build(name: str) -> Path:
    """Return the path of the workload's executable (a .py for Python ones),
    compiling it once: the binary is cached by the hash of its sources, flags and
    gcc version, in /tmp/ckptd-workloads-<uid>-<hash>/ (readable by all)."""
    spec = spec_of(name)
    source = HERE / spec.source
    if spec.is_python:
        return source
    gcc, version = _gcc()
    flags = (*CFLAGS, *spec.cflags)
    h = hashlib.sha256()
    for part in (source.read_bytes(), (HERE / "wl.h").read_bytes(), " ".join(flags).encode(),
                 version.encode()):
        h.update(part)
        h.update(b"\0")
    binary = _cache_dir(h.hexdigest()[:16]) / name
    if binary.exists():
        return binary
    # Concurrent sessions may build the same binary: compile aside, rename into place.
    tmp = binary.with_name(f".{name}.{os.getpid()}.{secrets.token_hex(4)}")
    proc = subprocess.run([gcc, *flags, "-o", str(tmp), str(source)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise WorkloadError(f"building {name} failed:\n{proc.stderr}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, binary)
    return binary


def build_all(names: list[str] | None = None) -> dict[str, Path]:
    """Build several workloads in parallel (gcc runs are independent)."""
    names = list(WORKLOADS) if names is None else names
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(names, pool.map(build, names)))


# -- running -------------------------------------------------------------------

def parse_ready(text: str) -> dict[str, str]:
    """DIR/ready: key=value lines (a value may contain '=')."""
    info = {}
    for line in text.splitlines():
        if "=" in line:
            key, _, value = line.partition("=")
            info[key.strip()] = value.strip()
    return info


def _alive(pid: int) -> bool:
    """A process with this pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class Workload:
    """One running workload and its directory."""

    def __init__(self, name: str, dir: Path, proc: subprocess.Popen, argv: list[str],
                 output: Path) -> None:
        self.name = name
        self.dir = dir
        self.proc = proc
        self.argv = argv
        self.output_path = output
        self.ready_info: dict[str, str] | None = None

    @classmethod
    def start(cls, name: str, dir: Path | str, *, args: tuple[str, ...] = (), uid: int | None = None,
              gid: int | None = None, stdout: Path | str | None = None,
              env: dict[str, str] | None = None) -> Workload:
        """Spawn workload `name` on DIR (created if missing) in a new session, stdin
        /dev/null, stdout and stderr appended to `stdout` (default DIR/output; never a
        pipe). With `uid`, it runs as that user (and gid, default uid) and DIR is
        given to it. `env` is added to this process's environment."""
        dir = Path(dir).resolve()
        dir.mkdir(parents=True, exist_ok=True)
        program = build(name)
        argv = [sys.executable, str(program)] if spec_of(name).is_python else [str(program)]
        argv += [str(dir), *args]
        output = Path(stdout) if stdout is not None else dir / "output"
        user = {}
        if uid is not None:
            gid = uid if gid is None else gid
            os.chown(dir, uid, gid)
            user = {"user": uid, "group": gid, "extra_groups": []}
        full_env = {**os.environ, **(env or {})}
        with open(os.devnull, "rb") as stdin, open(output, "ab") as out:
            proc = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=out, env=full_env,
                                    start_new_session=True, close_fds=True, **user)
        return cls(name, dir, proc, argv, output)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except OSError:
            return ""

    def _result_text(self) -> str | None:
        try:
            return (self.dir / "result").read_text()
        except FileNotFoundError:
            return None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, str]:
        """Wait for DIR/ready and return its key=value pairs."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ready_info = parse_ready((self.dir / "ready").read_text())
                return self.ready_info
            except FileNotFoundError:
                pass
            if (early := self._result_text()) is not None:
                raise WorkloadError(f"{self.name} failed before ready: {early.strip()}")
            if self.proc.poll() is not None:
                raise WorkloadError(f"{self.name} exited with {self.proc.returncode} before ready; "
                                    f"output:\n{self.output()}")
            if time.monotonic() > deadline:
                raise WorkloadError(f"{self.name} not ready after {timeout}s; output:\n{self.output()}")
            time.sleep(POLL)

    def go(self) -> None:
        (self.dir / "go").touch()

    def result(self, timeout: float = RESULT_TIMEOUT) -> str:
        """Wait for DIR/result and return it stripped ("PASS" or "FAIL: ..." lines).
        Works on a restored process too (same pid, not our child)."""
        deadline = time.monotonic() + timeout
        while True:
            if (text := self._result_text()) is not None:
                return text.strip()
            self.proc.poll()    # reap our own child if it died, so /proc tells the truth
            if not _alive(self.pid):
                time.sleep(0.1)     # it may have written the result just before exiting
                if (text := self._result_text()) is not None:
                    return text.strip()
                raise WorkloadError(f"{self.name} (pid {self.pid}) is gone without a result; "
                                    f"output:\n{self.output()}")
            if time.monotonic() > deadline:
                raise WorkloadError(f"{self.name} gave no result {timeout}s after go; "
                                    f"output:\n{self.output()}")
            time.sleep(POLL)

    def count(self) -> int:
        """counter.py's current count (DIR/count)."""
        return int((self.dir / "count").read_text())

    def reap(self, timeout: float = 10.0) -> int:
        """Wait for the process we spawned to die (after a checkpoint that kills it)
        and collect it, so that its pid is free for the restore; returns its status."""
        return self.proc.wait(timeout)

    def _is_ours(self) -> bool:
        """The pid still runs this workload (the original or its restored copy)."""
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return [a.decode(errors="replace") for a in cmdline if a] == self.argv

    def kill(self) -> None:
        """SIGKILL the workload (original or restored); idempotent."""
        if self.proc.poll() is None or (_alive(self.pid) and self._is_ours()):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# -- the view from outside -----------------------------------------------------

STATUS_FIELDS = ("Umask", "Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "Seccomp_filters",
                 "SigBlk", "SigIgn", "SigCgt", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                 "Cpus_allowed_list")

# Objects without a path are named by inode ("pipe:[1234]"); a restore makes new
# ones. Keep which fds share an object, drop the number.
_INODE_TARGET = re.compile(r"^(pipe|socket|anon_inode:\w+|\w+):\[(\d+)\]$")


def parse_maps(text: str) -> list[str]:
    """/proc/PID/maps -> "start-end perms offset path" per mapping (device and
    inode dropped: a restore maps the same files, but that is for the caller)."""
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) >= 5:
            path = parts[5].strip() if len(parts) > 5 else ""
            out.append(f"{parts[0]} {parts[1]} {parts[2]} {path}".rstrip())
    return out


def parse_status(text: str, fields: tuple[str, ...] = STATUS_FIELDS) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in fields:
            values[key] = " ".join(value.split())
    return values


def parse_stat(text: str) -> dict[str, str]:
    """/proc/PID/stat -> comm, nice, policy (comm may hold spaces and parentheses)."""
    comm = text[text.index("(") + 1:text.rindex(")")]
    rest = text[text.rindex(")") + 2:].split()   # rest[0] is field 3 (state)
    return {"comm": comm, "nice": rest[19 - 3], "policy": rest[41 - 3]}


def parse_fdinfo(text: str) -> dict[str, str]:
    info = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in ("pos", "flags"):
            info[key] = value.strip()
    return info


def normalize_targets(targets: dict[int, str]) -> dict[int, str]:
    """Replace inode numbers by their order of first appearance: pipe:[#1]."""
    seen: dict[str, int] = {}
    out = {}
    for fd in sorted(targets):
        m = _INODE_TARGET.match(targets[fd])
        if m:
            ordinal = seen.setdefault(targets[fd], len(seen) + 1)
            out[fd] = f"{m.group(1)}:[#{ordinal}]"
        else:
            out[fd] = targets[fd]
    return out


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError as e:
        return f"<{e.strerror}>"


def _fds(pid: int) -> dict[str, dict[str, str]]:
    base = Path(f"/proc/{pid}")
    targets: dict[int, str] = {}
    infos: dict[int, dict[str, str]] = {}
    for entry in os.listdir(base / "fd"):
        fd = int(entry)
        try:   # an fd may close while we look
            targets[fd] = os.readlink(base / "fd" / entry)
            infos[fd] = parse_fdinfo((base / "fdinfo" / entry).read_text())
        except FileNotFoundError:
            targets.pop(fd, None)
    return {str(fd): {"target": target, **infos[fd]} for fd, target in normalize_targets(targets).items()}


# What each thread shows in /proc/PID/task/TID/status (besides its comm): the
# state Linux keeps per thread and that a restore must give each one back.
THREAD_FIELDS = ("SigBlk", "Uid", "Gid", "CapEff", "NoNewPrivs", "Seccomp", "Cpus_allowed_list")


def _threads(pid: int) -> dict[str, dict[str, str]]:
    base = Path(f"/proc/{pid}/task")
    out = {}
    for tid in sorted(os.listdir(base), key=int):
        try:   # a thread may end while we look
            status = parse_status((base / tid / "status").read_text(), THREAD_FIELDS)
            comm = (base / tid / "comm").read_text().rstrip("\n")
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[tid] = {"comm": comm, **status}
    return out


def outside_view(pid: int) -> dict:
    """What /proc shows of a process, for before/after comparison: maps, fds
    (target, flags, pos), selected status fields, comm/nice/policy, cmdline,
    environ, the exe, cwd and root links, and per thread (by tid) its comm,
    blocked mask, credentials, seccomp mode and CPU affinity."""
    base = Path(f"/proc/{pid}")
    return {
        "threads": _threads(pid),
        "maps": parse_maps((base / "maps").read_text()),
        "fds": _fds(pid),
        "status": parse_status((base / "status").read_text()),
        "stat": parse_stat((base / "stat").read_text()),
        "cmdline": (base / "cmdline").read_bytes().decode(errors="replace").split("\0"),
        "environ": (base / "environ").read_bytes().decode(errors="replace").split("\0"),
        "exe": _readlink(base / "exe"),
        "cwd": _readlink(base / "cwd"),
        "root": _readlink(base / "root"),
    }


def merge_maps(lines: list[str]) -> list[str]:
    """Join neighbouring mappings that differ only in where the kernel cut them
    (same perms and path, contiguous addresses and file offsets): after a restore
    the kernel may merge or split VMAs differently, and nothing visible changes."""
    out: list[tuple[int, int, str, int, str]] = []
    for line in lines:
        addrs, perms, offset, *path = line.split(" ", 3)
        start, end = (int(a, 16) for a in addrs.split("-"))
        entry = (start, end, perms, int(offset, 16), path[0] if path else "")
        if out:
            p_start, p_end, p_perms, p_off, p_path = out[-1]
            anon = not p_path or p_path.startswith("[")
            if (p_end == start and p_perms == perms and p_path == entry[4]
                    and (anon or p_off + (p_end - p_start) == entry[3])):
                out[-1] = (p_start, end, perms, p_off, p_path)
                continue
        out.append(entry)
    return [f"{s:x}-{e:x} {perms} {off:08x} {path}".rstrip() for s, e, perms, off, path in out]


def _flatten(view: dict) -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in view.items():
        if key == "maps":
            continue
        if key in ("fds", "threads"):
            for fd, info in value.items():
                for field, v in info.items():
                    flat[f"{key}.{fd}.{field}"] = v
        elif isinstance(value, dict):
            for field, v in value.items():
                flat[f"{key}.{field}"] = v
        else:
            flat[key] = value
    return flat


def compare_views(before: dict, after: dict, ignore: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Differences between two outside_view()s, one line each:
    "fds.11.pos: '3' -> '12'", "fds.7.target: gone (was 'pipe:[#1]')",
    "maps: - <line>" / "maps: + <line>".
    `ignore` holds patterns ('*' matches anything, the rest is literal) tried on the
    key ("fds.1.pos", "fds.*.pos", "status.SigCgt", "maps") and on the whole line
    ("maps: * [heap]")."""
    diffs = []
    old_maps, new_maps = merge_maps(before.get("maps", [])), merge_maps(after.get("maps", []))
    old_set, new_set = set(old_maps), set(new_maps)
    diffs += [("maps", f"maps: - {line}") for line in old_maps if line not in new_set]
    diffs += [("maps", f"maps: + {line}") for line in new_maps if line not in old_set]
    old, new = _flatten(before), _flatten(after)
    for key in sorted(old.keys() | new.keys(), key=_natural):
        if key not in new:
            diffs.append((key, f"{key}: gone (was {old[key]!r})"))
        elif key not in old:
            diffs.append((key, f"{key}: new ({new[key]!r})"))
        elif old[key] != new[key]:
            diffs.append((key, f"{key}: {old[key]!r} -> {new[key]!r}"))
    patterns = [_pattern(p) for p in ignore]
    return [line for key, line in diffs
            if not any(p.fullmatch(key) or p.fullmatch(line) for p in patterns)]


def _pattern(glob: str) -> re.Pattern[str]:
    """'*' matches anything; everything else is literal ("[heap]" included)."""
    return re.compile(".*".join(re.escape(part) for part in glob.split("*")), re.DOTALL)


def _natural(key: str) -> list[tuple[int, int | str]]:
    """Sort key that puts fds.9 before fds.10."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", key)]
