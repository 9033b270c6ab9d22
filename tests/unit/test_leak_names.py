"""The names ``--external`` takes (ckptd/engine/leaks.py) and the report a
refused checkpoint prints: pure functions, no privilege."""

from __future__ import annotations

import os

import pytest

from ckptd.engine import leaks
from ckptd.engine.leaks import Holder, Leak
from ckptd.errors import StateError, UsageError


@pytest.mark.parametrize("name, canonical", [
    ("file:/tmp/shared.log", "file:/tmp/shared.log"),
    ("file:/tmp/with space (deleted)", "file:/tmp/with space (deleted)"),
    ("file:pipe:[1234]", "file:pipe:[1234]"),
    ("mem:00:01:2049", "mem:00:01:2049"),
    ("mem:0:1:2049", "mem:00:01:2049"),
    ("mem:FD:1A:77", "mem:fd:1a:77"),
    ("fdtable:42", "fdtable:42"),
    ("fs:0042", "fs:42"),
    ("vm:7", "vm:7"),
    ("sighand:7", "sighand:7"),
])
def test_names_parse_to_their_canonical_form(name: str, canonical: str) -> None:
    assert leaks.parse_external(name) == canonical


@pytest.mark.parametrize("name, says", [
    ("/tmp/shared.log", "expected one of"),
    ("file:", "expected one of"),
    ("files:/tmp/x", "expected one of"),
    ("all", "expected one of"),
    ("mem:2049", "mem:MAJ:MIN:INO"),
    ("mem:00:01:x", "mem:MAJ:MIN:INO"),
    ("mem:00:01:-1", "mem:MAJ:MIN:INO"),
    ("vm:abc", "vm:PID"),
    ("fs:0", "fs:PID"),
    ("process:12", "cannot be accepted"),
])
def test_bad_names_are_usage_errors(name: str, says: str) -> None:
    with pytest.raises(UsageError, match=says.replace("(", r"\(")):
        leaks.parse_external(name)


def test_mem_name_matches_what_maps_prints() -> None:
    assert leaks.mem_name("00:01", 2049) == "mem:00:01:2049"
    assert leaks.parse_external(leaks.mem_name("fd:01", 9)) == "mem:fd:01:9"


def _leak(kind: str, name: str, what: str = "") -> Leak:
    return Leak(kind, name, what, (Holder(100, fd=3),), (Holder(1, fd=7),))


def test_report_lists_one_leak_per_line_and_how_to_accept() -> None:
    found = (_leak("file", "file:/tmp/a b.log", "/tmp/a b.log"),
             Leak("mem", "mem:00:01:5", "/dev/zero (deleted)", (Holder(101, address=0x7f00),),
                  (Holder(1, address=0x7e00),)))
    text = leaks.render(100, found, ("process group 9 of pid 100 is led from outside",))
    head, *lines = text.splitlines()
    assert head == "the tree of pid 100 shares 2 resources with processes outside it"
    assert all(line.startswith("  ") for line in lines), "the report is indented"
    assert lines[0].startswith("  file:/tmp/a b.log: open file description of pid 100 fd 3;")
    assert "also held by pid 1 fd 7" in lines[0]
    assert lines[1].startswith("  mem:00:01:5: shared memory /dev/zero (deleted) of pid 101 "
                               "at 0x7f00; also held by pid 1 at 0x7e00")
    assert lines[2] == "  note: process group 9 of pid 100 is led from outside"
    assert lines[-1].endswith("--external 'file:/tmp/a b.log' --external mem:00:01:5")


def test_a_process_from_outside_cannot_be_accepted() -> None:
    text = leaks.render(1, (_leak("process", "process:77", "in the container's PID namespace"),))
    assert "cannot be checkpointed with the tree" in text and "--external" not in text


def test_leak_error_is_a_wrong_state_and_keeps_context_on_its_first_line() -> None:
    e = leaks.LeakError(100, (_leak("file", "file:/x", "/x"),))
    assert isinstance(e, StateError) and e.leaks[0].name == "file:/x"
    e.context["pid"] = 100
    first, *rest = str(e).splitlines()
    assert first.endswith("outside it (pid=100)")
    assert rest[-1].endswith("--external file:/x")


def test_a_caller_who_is_not_root_is_not_told_about_other_users_processes() -> None:
    """Our own process (uid 0 here, or the test's uid) is named to root and
    to its owner; to anyone else it is another user's."""
    me = os.getpid()
    leak = Leak(kind="file", name="file:/x", what="/x",
                      inside=(Holder(pid=me, fd=3),),
                      outside=(Holder(pid=me, fd=4), Holder(pid=me, fd=5)))
    assert f"pid {me} fd 4" in leak.line(0)
    assert f"pid {me} fd 4" in leak.line(os.getuid() or 0)
    stranger = os.getuid() + 12345
    line = leak.line(stranger)
    assert f"pid {me} fd 4" not in line and f"fd 5" not in line
    assert line.endswith(f"also held by {leaks.OTHER_USER}"), line   # said once
    assert leaks.OTHER_USER in str(leaks.LeakError(1, (leak,), viewer=stranger))
