"""Leak detection: what a tree being checkpointed shares with processes
outside it (Linux-CR's "leaks"), and the names that accept such sharing.

A restore recreates only the tree. Anything the tree shares with a process
outside it would come back split in two — one open file description
(offset, flags) becoming two, shared memory becoming a private copy, an fd
table / cwd / address space / signal handler table shared through clone()
becoming the tree's own — or, for a process that entered a container from
outside, not come back at all. ``find_leaks`` names every such resource;
``check`` refuses the checkpoint with a report (``LeakError``) unless the
caller accepts each one by name (``--external NAME``), in which case it is
checkpointed as a private copy.

Sharing inside the tree is not a leak (tree.py and its restore handle it),
nor are process groups and sessions led from outside (restore handles them:
they appear as notes), nor stateless devices (/dev/null ...), nor the
holdings of pids the caller names as its own infrastructure (a container's
shim holds the container's log).

One pass over /proc, cheap tests first: a readlink of each outside fd (the
same open file description reads back the same link text), a stat only when
that text is one the tree holds, kcmp only to confirm; /proc/PID/maps only
when the tree has shared memory; cwd and exe links as the prefilters for
shared fs info and address spaces, the fd listing for shared fd tables.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import structlog

from ckptd.errors import StateError, UsageError
from ckptd.kernel import proctask
from ckptd.kernel import task as task_mod
from ckptd.v1 import image_pb2

log = structlog.get_logger(__name__)

PROC = "/proc"
# Stateless character devices: a second description of one behaves exactly
# like the shared one (files.DEVICES lists what the engine reopens by path).
STATELESS_DEVICES = frozenset({"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"})

# Leak kinds: the word before ":" in a name, and what it means in a report.
FILE, MEM, FDTABLE, FS, VM, SIGHAND, PROCESS = (
    "file", "mem", "fdtable", "fs", "vm", "sighand", "process")
KINDS = {
    FILE: "open file description",
    MEM: "shared memory",
    FDTABLE: "fd table (CLONE_FILES)",
    FS: "cwd/root/umask (CLONE_FS)",
    VM: "address space (CLONE_VM)",
    SIGHAND: "signal handler table (CLONE_SIGHAND)",
    PROCESS: "process entered from outside",
}
# What a private copy cannot stand in for: a process that is not part of
# the tree cannot be checkpointed with it, nor left behind inside it.
NOT_ACCEPTABLE = frozenset({PROCESS})
_TABLES = ((FDTABLE, task_mod.KCMP_FILES), (FS, task_mod.KCMP_FS),
           (VM, task_mod.KCMP_VM), (SIGHAND, task_mod.KCMP_SIGHAND))
# How an outside holder of another user reads to a caller who is not root.
OTHER_USER = "a process of another user"
_MEM_NAME = re.compile(r"^([0-9a-f]{1,8}):([0-9a-f]{1,8}):(\d+)$")


# ---------------------------------------------------------------- names

def mem_name(dev: str, ino: int) -> str:
    """``mem:MAJ:MIN:INO`` (MAJ:MIN in hex as /proc/PID/maps prints it)."""
    major, minor = dev.split(":")
    return f"{MEM}:{int(major, 16):02x}:{int(minor, 16):02x}:{ino}"


def parse_external(name: str) -> str:
    """A name as ``--external`` takes it, in canonical form; UsageError with
    the accepted syntax if it is not one."""
    kind, sep, rest = name.partition(":")
    if not sep or not rest or kind not in KINDS:
        raise UsageError(f"bad external resource name {name!r}: expected one of "
                         "file:PATH, mem:MAJ:MIN:INO, fdtable:PID, fs:PID, vm:PID, "
                         "sighand:PID, as a refused checkpoint's report prints them")
    if kind in NOT_ACCEPTABLE:
        raise UsageError(f"{name!r} cannot be accepted: a {KINDS[kind]} cannot be "
                         "checkpointed as a private copy")
    if kind == FILE:
        return name
    if kind == MEM:
        m = _MEM_NAME.match(rest.lower())
        if not m:
            raise UsageError(f"bad external memory name {name!r}: expected mem:MAJ:MIN:INO "
                             "(hex device numbers, decimal inode), e.g. mem:00:01:2049")
        return mem_name(f"{m[1]}:{m[2]}", int(m[3]))
    if not rest.isdigit() or int(rest) <= 0:
        raise UsageError(f"bad external resource name {name!r}: expected {kind}:PID")
    return f"{kind}:{int(rest)}"


def parse_externals(names: Iterable[str]) -> frozenset[str]:
    return frozenset(parse_external(n) for n in names)


# ---------------------------------------------------------------- the report

@dataclass(frozen=True)
class Holder:
    """A process holding a resource: as an fd, a mapping, or itself."""

    pid: int
    fd: int = -1
    address: int = 0

    def __str__(self) -> str:
        where = f" fd {self.fd}" if self.fd >= 0 else ""
        where += f" at {self.address:#x}" if self.address else ""
        return f"pid {self.pid}{where}"


@dataclass(frozen=True)
class Leak:
    kind: str                        # FILE, MEM, ... (KINDS)
    name: str                        # what --external takes to accept it
    what: str                        # a path, or what the kernel shows
    inside: tuple[Holder, ...]       # the tree's holders
    outside: tuple[Holder, ...]      # the processes outside that hold it too

    @property
    def acceptable(self) -> bool:
        return self.kind not in NOT_ACCEPTABLE

    def line(self, viewer: int = 0) -> str:
        """One line of the report for a caller of uid ``viewer``: processes of
        other users are not named to a caller who is not root."""
        inside = ", ".join(map(str, self.inside))
        shown = [f"{h} ({_comm(h.pid)})" if _may_see(viewer, h.pid) else OTHER_USER
                 for h in self.outside]
        outside = ", ".join(dict.fromkeys(shown))
        what = f" {self.what}" if self.what and self.what not in self.name else ""
        return f"{self.name}: {KINDS[self.kind]}{what} of {inside}; also held by {outside}"

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "name": self.name, "what": self.what,
                "inside": [str(h) for h in self.inside],
                "outside": [str(h) for h in self.outside]}


@dataclass(frozen=True)
class Report:
    leaks: tuple[Leak, ...]
    notes: tuple[str, ...] = ()
    scanned: int = 0                 # outside processes looked at
    hidden: tuple[int, ...] = ()     # outside processes we may not look at
    ms: float = 0.0

    def names(self) -> list[str]:
        return sorted({leak.name for leak in self.leaks})


class LeakError(StateError):
    """The tree shares resources with processes outside it."""

    def __init__(self, root: int, leaks: Iterable[Leak], notes: Iterable[str] = (),
                 viewer: int = 0) -> None:
        self.leaks = tuple(leaks)
        super().__init__(render(root, self.leaks, tuple(notes), viewer))


def render(root: int, leaks: tuple[Leak, ...], notes: tuple[str, ...] = (),
           viewer: int = 0) -> str:
    """The message of a refusal: a headline, then indented, one per line,
    each leak, the notes and how to accept them (ckptctl prints the
    indented lines as a report under its one-line error)."""
    lines = [f"the tree of pid {root} shares {len(leaks)} resource"
             f"{'s' if len(leaks) != 1 else ''} with processes outside it"]
    lines += [f"  {leak.line(viewer)}" for leak in leaks]
    lines += [f"  note: {n}" for n in notes]
    ok = sorted({leak.name for leak in leaks if leak.acceptable})
    if any(not leak.acceptable for leak in leaks):
        lines.append("  a process that entered from outside cannot be checkpointed with the "
                     "tree: end it, or checkpoint a tree that holds it")
    if ok:
        lines.append("  to checkpoint them as private copies (a file reopened at its offset, "
                     "memory copied): " + " ".join(f"--external {shlex.quote(n)}" for n in ok))
    return "\n".join(lines)


# ---------------------------------------------------------------- the check

@dataclass
class _Tree:
    """What the tree holds, keyed the way outside holdings are looked up."""

    root: int
    pids: set[int]
    links: dict[str, list[tuple[int, int, tuple[int, int]]]] = field(default_factory=dict)
    shm: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)   # token -> ...
    fd_sets: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    cwds: dict[str, list[int]] = field(default_factory=dict)
    exes: dict[str, list[int]] = field(default_factory=dict)
    pid_ns: str = ""                # set when the tree is a PID namespace of its own


def check(root: int, pids: list[int], files: list[image_pb2.Files], *,
          zombies: Collection[int] = (), ignore: Collection[int] = (),
          accept: Collection[str] = (), viewer: int = 0) -> Report:
    """Refuse (LeakError) unless every leak of the tree is accepted by name;
    a name that matches nothing is a UsageError (a typo would otherwise
    accept nothing and go unnoticed). Returns the report (accepted leaks)."""
    accept = parse_externals(accept)
    report = find_leaks(root, pids, files, zombies=zombies, ignore=ignore)
    found = set(report.names())
    unmatched = sorted(accept - found)
    refused = [leak for leak in report.leaks if leak.name not in accept]
    log.info("leaks_checked", pid=root, leaks=[leak.as_dict() for leak in report.leaks],
             notes=list(report.notes), accepted=sorted(accept & found),
             scanned=report.scanned, hidden=list(report.hidden), ms=round(report.ms, 2))
    if unmatched:
        # First: the name meant for a leak may be the one mistyped.
        raise UsageError(f"--external {', '.join(unmatched)}: matches nothing the tree of pid "
                         f"{root} shares with outside processes"
                         + (f" (it shares: {', '.join(sorted(found))})" if found else ""),
                         pid=root)
    if refused:
        raise LeakError(root, refused, report.notes, viewer)
    return report


def find_leaks(root: int, pids: list[int], files: list[image_pb2.Files], *,
               zombies: Collection[int] = (), ignore: Collection[int] = ()) -> Report:
    """Every resource the tree (``pids``, parents first, with what collect()
    gathered of their fds) shares with a process outside it and ``ignore``."""
    started = time.monotonic()
    tree = _inventory(root, pids, files)
    skip = tree.pids | set(zombies) | set(ignore)
    found: dict[tuple[str, str], tuple[list[Holder], list[Holder], str]] = {}
    candidates: dict[str, list[tuple[int, list[int]]]] = {FDTABLE: [], FS: [], VM: []}
    scanned = 0
    hidden = []
    for entry in os.scandir(PROC):
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        pid = int(entry.name)
        try:
            if _scan_process(pid, tree, found, candidates):
                scanned += 1
        except (FileNotFoundError, ProcessLookupError):
            continue   # it exited while we looked: it holds nothing any more
        except PermissionError:
            # Not even root may look (here: PID 1 of the VM's own machinery):
            # named in the log line, never skipped silently.
            hidden.append(pid)
    for kind, pairs in _shared_tables(candidates).items():
        for inside, outside in pairs:
            _add(found, kind, f"{kind}:{inside}", "", Holder(inside), Holder(outside))
    leaks = tuple(Leak(kind, name, what, tuple(dict.fromkeys(ins)), tuple(dict.fromkeys(outs)))
                  for (kind, name), (ins, outs, what) in sorted(found.items()))
    return Report(leaks=leaks, notes=tuple(_notes(pids, set(pids) | set(zombies))),
                  scanned=scanned, hidden=tuple(hidden), ms=(time.monotonic() - started) * 1000)


def _inventory(root: int, pids: list[int], files: list[image_pb2.Files]) -> _Tree:
    tree = _Tree(root=root, pids=set(pids))
    for pid, fds in zip(pids, files):
        for f in fds.fds:
            if f.is_dup:
                continue   # the same description as an earlier fd of this process
            link = os.readlink(f"{PROC}/{pid}/fd/{f.fd}")
            if link in STATELESS_DEVICES:
                continue
            tree.links.setdefault(link, []).append((pid, f.fd, (f.stat.dev, f.stat.ino)))
        tree.fd_sets.setdefault(tuple(sorted(f.fd for f in fds.fds)), []).append(pid)
        for v in proctask.parse_smaps(_read(f"{PROC}/{pid}/maps")):
            if v.shared and _is_shm(v.path):
                tree.shm.setdefault(f" {v.dev} {v.inode} ", []).append((pid, v.start, v.path))
                tree.links.setdefault(v.path, [])   # an outside fd on it (memfd)
        tree.cwds.setdefault(os.readlink(f"{PROC}/{pid}/cwd"), []).append(pid)
        tree.exes.setdefault(os.readlink(f"{PROC}/{pid}/exe"), []).append(pid)
    own = os.readlink(f"{PROC}/self/ns/pid")
    ns = os.readlink(f"{PROC}/{root}/ns/pid")
    if ns != own and _ns_pid(root) == 1:
        tree.pid_ns = ns
    return tree


def _is_shm(path: str) -> bool:
    """Memory that lives only as long as its users: MAP_SHARED anonymous
    (shown as deleted /dev/zero), SysV segments, memfds, deleted files."""
    return (path.startswith(("/SYSV", "/memfd:")) or path.endswith(" (deleted)"))


def _scan_process(pid: int, tree: _Tree, found: dict,
                  candidates: dict[str, list[tuple[int, list[int]]]]) -> bool:
    """Look at one outside process; False if it has no user space (a kernel thread)."""
    base = f"{PROC}/{pid}"
    try:
        exe = os.readlink(f"{base}/exe")
    except FileNotFoundError:
        return False    # a kernel thread (or a zombie): no files, no memory
    if tree.pid_ns and os.readlink(f"{base}/ns/pid") == tree.pid_ns:
        _add(found, PROCESS, f"{PROCESS}:{pid}", "in the container's PID namespace",
             Holder(tree.root), Holder(pid))
    fds = os.listdir(f"{base}/fd")
    for name in fds if tree.links else ():   # nothing the tree holds could match
        try:
            link = os.readlink(f"{base}/fd/{name}")
        except FileNotFoundError:
            continue   # closed meanwhile
        if link in tree.links:
            _match_fd(pid, int(name), link, tree, found)
    for kind, matches in ((VM, tree.exes.get(exe)),
                          (FDTABLE, tree.fd_sets.get(tuple(sorted(int(n) for n in fds)))),
                          (FS, tree.cwds.get(os.readlink(f"{base}/cwd")))):
        if matches:
            candidates[kind].append((pid, matches))
    if tree.shm:
        text = _read(f"{base}/maps")
        for token, holders in tree.shm.items():
            if token in text:
                _match_maps(pid, text, token, holders, found)
    return True


def _match_fd(pid: int, fd: int, link: str, tree: _Tree, found: dict) -> None:
    try:
        st = os.stat(f"{PROC}/{pid}/fd/{fd}")
    except FileNotFoundError:
        return   # closed meanwhile
    key = (st.st_dev, st.st_ino)
    for in_pid, in_fd, in_key in tree.links[link]:
        if in_key != key:
            continue
        # A pipe's other end is another description of the same inode: the
        # tree would lose its peer all the same.
        if link.startswith("pipe:") or task_mod.same_file_across(in_pid, in_fd, pid, fd):
            _add(found, FILE, f"{FILE}:{link}", link, Holder(in_pid, in_fd), Holder(pid, fd))
    for token, holders in tree.shm.items():
        dev, ino = token.split()
        if int(ino) == st.st_ino and holders[0][2] == link:
            for in_pid, start, path in holders:
                _add(found, MEM, mem_name(dev, st.st_ino), path, Holder(in_pid, address=start),
                     Holder(pid, fd))


def _match_maps(pid: int, text: str, token: str, holders: list[tuple[int, int, str]],
                found: dict) -> None:
    dev, ino = token.split()
    for line in text.splitlines():
        if token in line + " ":
            for in_pid, start, path in holders:
                _add(found, MEM, mem_name(dev, int(ino)), path, Holder(in_pid, address=start),
                     Holder(pid, address=int(line.split("-", 1)[0], 16)))


def _shared_tables(candidates: dict[str, list[tuple[int, list[int]]]]
                   ) -> dict[str, list[tuple[int, int]]]:
    """(tree pid, outside pid) pairs sharing each kind of table, kcmp only
    where the prefilter matched: same fd numbers (fd table), same cwd (fs),
    same exe (address space; signal handlers are shared only along with it)."""
    kcmp_kind = dict(_TABLES)
    out: dict[str, list[tuple[int, int]]] = {}
    for kind, outside in candidates.items():
        for pid, inside_pids in outside:
            try:
                for inside in inside_pids:
                    if task_mod.kcmp(inside, pid, kcmp_kind[kind]) != 0:
                        continue
                    out.setdefault(kind, []).append((inside, pid))
                    if kind == VM and task_mod.kcmp(inside, pid, task_mod.KCMP_SIGHAND) == 0:
                        out.setdefault(SIGHAND, []).append((inside, pid))
            except (FileNotFoundError, ProcessLookupError):
                continue   # exited meanwhile
    return out


def _notes(pids: list[int], inside: set[int]) -> list[str]:
    """Process groups and sessions led from outside: restore recreates them
    (a --pid tree started from a shell is in the shell's session)."""
    notes = []
    seen: set[tuple[str, int]] = set()
    for pid in pids:
        fields = _read(f"{PROC}/{pid}/stat").rsplit(")", 1)[1].split()
        for what, leader in (("process group", int(fields[2])), ("session", int(fields[3]))):
            if leader and leader not in inside and (what, leader) not in seen:
                seen.add((what, leader))
                notes.append(f"{what} {leader} of pid {pid} is led from outside the tree "
                             "(not a leak: a restore recreates it)")
    return notes


def _add(found: dict, kind: str, name: str, what: str, inside: Holder, outside: Holder) -> None:
    ins, outs, _ = found.setdefault((kind, name), ([], [], what))
    ins.append(inside)
    outs.append(outside)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _ns_pid(pid: int) -> int:
    for line in _read(f"{PROC}/{pid}/status").splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return pid


def _comm(pid: int) -> str:
    try:
        return _read(f"{PROC}/{pid}/comm").strip()
    except OSError:
        return "gone"


def _may_see(viewer: int, pid: int) -> bool:
    """Whether a caller of uid ``viewer`` may be told about ``pid``: root
    may; anyone else only about their own processes (an exited one is
    nobody's)."""
    if viewer == 0:
        return True
    try:
        return os.stat(f"{PROC}/{pid}").st_uid == viewer
    except OSError:
        return False
