"""The /proc parsers on captured text (no privilege needed)."""

from __future__ import annotations

import os

import pytest

from ckptd.kernel import procfs

# Captured on the target machine (kernel 6.18): /proc/self/stat of `cat`.
STAT_CAT = (
    "16352 (cat) R 16309 16309 3031 0 -1 4194304 103 0 0 0 0 0 0 0 20 0 1 0 73033 "
    "3133440 417 18446744073709551615 94662966345728 94662966365609 140720742234192 0 0 "
    "0 0 0 0 0 0 0 17 1 0 0 0 0 0 94662966381616 94662966383232 94663885848576 "
    "140720742242819 140720742242839 140720742242839 140720742244331 0\n"
)

STATUS_EXCERPT = (
    "Name:\thead\nUmask:\t0022\nState:\tR (running)\nTgid:\t16353\nPid:\t16353\n"
    "PPid:\t16309\nUid:\t0\t0\t0\t0\nNStgid:\t16353\t1\nNSpid:\t16353\t1\n"
    "Threads:\t1\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000001000\n"
    "SigCgt:\t0000000000004002\n"
)

CGROUP_V1_V2 = (
    "9:name=systemd:/\n8:pids:/\n6:freezer:/ckptd/3f2a9c0d1e4b\n"
    "4:memory:/process_api/b86eeba9cb1cb50fc033d24bf7041cc4\n2:cpu,cpuacct:/\n"
    "0::/ckptd/3f2a9c0d1e4b\n"
)


def test_parse_stat_fields():
    stat = procfs.parse_stat(STAT_CAT)
    assert stat.pid == 16352
    assert stat.comm == "cat"
    assert stat.state == "R"
    assert (stat.ppid, stat.pgrp, stat.session) == (16309, 16309, 3031)
    assert stat.num_threads == 1
    assert stat.start_time == 73033
    assert not stat.is_zombie


@pytest.mark.parametrize("comm", ["a b", "x) (y", ") R 1 2", "(", ""])
def test_parse_stat_comm_with_spaces_and_parens(comm):
    text = STAT_CAT.replace("(cat) R ", f"({comm}) Z ")
    stat = procfs.parse_stat(text)
    assert stat.comm == comm
    assert stat.state == "Z" and stat.is_zombie
    assert stat.start_time == 73033


def test_parse_stat_of_this_process_matches_os():
    with open("/proc/self/stat") as f:
        stat = procfs.parse_stat(f.read())
    assert stat.pid == os.getpid()
    assert stat.ppid == os.getppid()
    assert stat.start_time > 0


def test_parse_status():
    status = procfs.parse_status(STATUS_EXCERPT)
    assert status["Name"] == "head"
    assert status["State"] == "R (running)"
    assert status["NSpid"].split() == ["16353", "1"]
    assert status["Uid"].split() == ["0"] * 4


def test_parse_signal_mask():
    status = procfs.parse_status(STATUS_EXCERPT)
    assert procfs.parse_signal_mask(status["SigCgt"]) == {2, 15}   # SIGINT, SIGTERM
    assert procfs.parse_signal_mask(status["SigIgn"]) == {13}      # SIGPIPE
    assert procfs.parse_signal_mask(status["SigBlk"]) == frozenset()
    assert procfs.parse_signal_mask("8000000000000000") == {64}


def test_parse_cgroup():
    entries = procfs.parse_cgroup(CGROUP_V1_V2)
    assert len(entries) == 6
    freezer = next(e for e in entries if "freezer" in e.controllers)
    assert freezer.hierarchy_id == 6 and freezer.path == "/ckptd/3f2a9c0d1e4b"
    assert entries[4].controllers == ("cpu", "cpuacct")
    unified = entries[-1]
    assert unified.hierarchy_id == 0 and unified.controllers == ()
    assert unified.path == "/ckptd/3f2a9c0d1e4b"
    assert entries[0].controllers == ("name=systemd",)


def test_readers_say_process_lookup_error_for_a_missing_pid():
    missing = 2**22 + 1   # above PID_MAX_LIMIT: never a live pid
    with pytest.raises(ProcessLookupError):
        procfs.read_stat(missing)
    with pytest.raises(ProcessLookupError):
        procfs.read_status(missing)
