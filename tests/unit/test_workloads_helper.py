"""The workload helper's parsers and view comparison, on captured text, plus a
look at a real unprivileged process. No root needed."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from pathlib import Path

import pytest

from workloads.workloads import (WorkloadError, build, compare_views, merge_maps,
                                 normalize_targets, outside_view, parse_fdinfo, parse_maps,
                                 parse_ready, parse_stat,
                                 parse_status)

MAPS = """\
55d0c8a00000-55d0c8a01000 r--p 00000000 fe:01 1234   /usr/bin/my prog
7ffd1a000000-7ffd1a021000 rw-p 00000000 00:00 0                          [stack]
7f0000000000-7f0000001000 ---p 00000000 00:00 0
7f0000002000-7f0000003000 rw-s 00002000 00:05 77 /tmp/x/shared.dat (deleted)
"""

STATUS = """\
Name:\tsleep
Umask:\t0022
State:\tS (sleeping)
Uid:\t1000\t1001\t1002\t1001
Groups:\t1000 1001 
SigBlk:\t0000000000010000
CapEff:\t0000000000000000
Seccomp:\t2
Cpus_allowed_list:\t0-1
"""

# comm "a) b (c" holds the separators a naive parser splits on; fields 3..52 follow,
# field 19 (nice) is 5 and field 41 (policy) is 3.
STAT = "123 (a) b (c) " + " ".join("5" if n == 19 else "3" if n == 41 else str(n * 100)
                                   for n in range(3, 53)) + "\n"


def test_parse_ready() -> None:
    text = "pid=42\ncwd=/tmp/a=b\n\nbig=0x7f00\n"
    assert parse_ready(text) == {"pid": "42", "cwd": "/tmp/a=b", "big": "0x7f00"}


def test_parse_maps_keeps_addresses_perms_offset_path() -> None:
    assert parse_maps(MAPS) == [
        "55d0c8a00000-55d0c8a01000 r--p 00000000 /usr/bin/my prog",
        "7ffd1a000000-7ffd1a021000 rw-p 00000000 [stack]",
        "7f0000000000-7f0000001000 ---p 00000000",
        "7f0000002000-7f0000003000 rw-s 00002000 /tmp/x/shared.dat (deleted)",
    ]


def test_parse_status_selects_fields() -> None:
    assert parse_status(STATUS) == {
        "Umask": "0022", "Uid": "1000 1001 1002 1001", "Groups": "1000 1001",
        "SigBlk": "0000000000010000", "CapEff": "0000000000000000", "Seccomp": "2",
        "Cpus_allowed_list": "0-1",
    }


def test_parse_stat_survives_parentheses_in_comm() -> None:
    assert parse_stat(STAT) == {"comm": "a) b (c", "nice": "5", "policy": "3"}


def test_parse_fdinfo() -> None:
    text = "pos:\t4242\nflags:\t02100002\nmnt_id:\t25\nino:\t99\n"
    assert parse_fdinfo(text) == {"pos": "4242", "flags": "02100002"}


def test_normalize_targets_keeps_sharing_not_inode_numbers() -> None:
    targets = {3: "pipe:[900]", 4: "pipe:[900]", 5: "socket:[77]", 6: "/dev/null",
               7: "anon_inode:[eventfd]", 8: "pipe:[12]"}
    assert normalize_targets(targets) == {3: "pipe:[#1]", 4: "pipe:[#1]", 5: "socket:[#2]",
                                          6: "/dev/null", 7: "anon_inode:[eventfd]", 8: "pipe:[#3]"}


def view(**changes) -> dict:
    base = {
        "maps": ["1000-2000 r--p 00000000 /bin/x", "3000-4000 rw-p 00000000 [heap]"],
        "fds": {"1": {"target": "/tmp/out", "pos": "10", "flags": "02101"},
                "10": {"target": "/tmp/f", "pos": "100", "flags": "0100000"}},
        "status": {"SigBlk": "0000000000000000", "Uid": "0 0 0 0"},
        "stat": {"comm": "x", "nice": "0", "policy": "0"},
        "cmdline": ["/bin/x", "dir"],
        "environ": ["A=1", ""],
        "exe": "/bin/x", "cwd": "/tmp", "root": "/",
    }
    base.update(changes)
    return base


def test_compare_views_equal() -> None:
    assert compare_views(view(), view()) == []


def test_compare_views_reports_each_difference() -> None:
    after = view(maps=["1000-2000 r--p 00000000 /bin/x", "3000-5000 rw-p 00000000 [heap]"],
                 fds={"1": {"target": "/tmp/out", "pos": "30", "flags": "02101"}},
                 stat={"comm": "x", "nice": "5", "policy": "0"}, cwd="/")
    assert compare_views(view(), after) == [
        "maps: - 3000-4000 rw-p 00000000 [heap]",
        "maps: + 3000-5000 rw-p 00000000 [heap]",
        "cwd: '/tmp' -> '/'",
        "fds.1.pos: '10' -> '30'",
        "fds.10.flags: gone (was '0100000')",
        "fds.10.pos: gone (was '100')",
        "fds.10.target: gone (was '/tmp/f')",
        "stat.nice: '0' -> '5'",
    ]


def test_merge_maps_joins_only_what_the_kernel_could_have_cut() -> None:
    lines = ["1000-2000 rw-p 00000000", "2000-3000 rw-p 00000000",          # anon: join
             "3000-4000 r--p 00000000", "5000-6000 r--p 00000000",          # gap: keep
             "6000-7000 r--p 00000000 /f", "7000-8000 r--p 00001000 /f",    # contiguous file: join
             "8000-9000 r--p 00005000 /f"]                                   # offset jumps: keep
    assert merge_maps(lines) == ["1000-3000 rw-p 00000000", "3000-4000 r--p 00000000",
                                 "5000-6000 r--p 00000000", "6000-8000 r--p 00000000 /f",
                                 "8000-9000 r--p 00005000 /f"]
    split = view(maps=["1000-1800 r--p 00000000 /bin/x", "1800-2000 r--p 00000800 /bin/x",
                       "3000-4000 rw-p 00000000 [heap]"])
    assert compare_views(view(), split) == []


def test_compare_views_ignore_patterns() -> None:
    after = view(maps=["1000-2000 r--p 00000000 /bin/x", "3000-5000 rw-p 00000000 [heap]"],
                 fds={"1": {"target": "/tmp/out", "pos": "30", "flags": "02101"},
                      "10": {"target": "/tmp/f", "pos": "100", "flags": "0100000"}})
    assert compare_views(view(), after, ignore=["fds.1.pos", "maps: * [heap]"]) == []
    assert compare_views(view(), after, ignore=["fds.*.pos", "maps"]) == []
    assert compare_views(view(), after, ignore=["maps"]) == ["fds.1.pos: '10' -> '30'"]


def sleeping(pid: int) -> bool:
    """In clock_nanosleep (230) or nanosleep (35): done with exec and ld.so."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] in ("35", "230")
    except (OSError, IndexError):
        return False


def test_outside_view_of_a_live_process_is_stable() -> None:
    with open(os.devnull, "rb") as null:
        proc = subprocess.Popen(["sleep", "30"], stdin=null, stdout=null)
    try:
        deadline = time.monotonic() + 10
        while not sleeping(proc.pid):
            assert time.monotonic() < deadline, "sleep never got to its nanosleep"
            time.sleep(0.01)
        first = outside_view(proc.pid)
        assert first["stat"]["comm"] == "sleep"
        assert first["cmdline"][:2] == ["sleep", "30"]
        assert first["fds"]["0"]["target"] == "/dev/null"
        assert any(line.endswith("[stack]") for line in first["maps"])
        assert compare_views(first, outside_view(proc.pid)) == []
    finally:
        proc.kill()
        proc.wait()


def has_interpreter(elf: Path) -> bool:
    """Whether an ELF64 executable has a PT_INTERP program header (is dynamic)."""
    data = elf.read_bytes()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def test_build_unknown_workload() -> None:
    with pytest.raises(WorkloadError, match="no workload 'nope'"):
        build("nope")


def test_build_caches_by_content() -> None:
    binary = build("regs")
    assert binary.name == "regs" and os.access(binary, os.X_OK)
    assert binary.parent.name.startswith("ckptd-workloads-")
    static = build("regs_static")
    assert static.parent != binary.parent     # other flags, other hash
    assert not has_interpreter(static) and has_interpreter(binary)
    assert build("counter").name == "counter.py" and build("counter").is_file()
