"""Pure pieces of ckptctl: state words, sizes, tables, progress lines, signal names."""

from __future__ import annotations

import io
import signal

import pytest

from ckptd.v1 import api_pb2
from ckptd_client import parse_signal, signal_name
from ckptd_client.progress import TransferProgress, transfer_line
from ckptd_client.render import (
    command_text, human_bytes, human_duration, ps_table, state_text, status_text, table,
)


@pytest.mark.parametrize("fields, text", [
    ({"state": api_pb2.CONTAINER_STATE_RUNNING}, "running"),
    ({"state": api_pb2.CONTAINER_STATE_FROZEN}, "frozen"),
    ({"state": api_pb2.CONTAINER_STATE_EXITED, "exit_code": 3}, "exited(3)"),
    ({"state": api_pb2.CONTAINER_STATE_EXITED}, "exited(0)"),
    ({"state": api_pb2.CONTAINER_STATE_EXITED, "exit_signal": 15}, "killed(SIGTERM)"),
    ({"state": api_pb2.CONTAINER_STATE_LOST}, "lost"),
    ({}, "unknown"),
])
def test_state_text(fields: dict, text: str) -> None:
    assert state_text(api_pb2.Container(**fields)) == text


@pytest.mark.parametrize("n, text", [
    (0, "0B"), (1023, "1023B"), (1536, "1.5K"), (12 * 2**20, "12M"), (5 * 2**30, "5.0G"),
    (3 * 2**40, "3.0T"),
])
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


def test_human_duration() -> None:
    assert [human_duration(s) for s in (-1, 5, 61, 7200, 3 * 86400)] == ["0s", "5s", "1m", "2h", "3d"]


def test_table_aligns_and_keeps_the_last_column_whole() -> None:
    assert table(("A", "BB", "C"), [("xxx", "y", "a long tail"), ("", "", "")]).split("\n") == [
        "A    BB  C",
        "xxx  y   a long tail",
        "",
    ]


def test_ps_table_age_and_long_commands() -> None:
    c = api_pb2.Container(id="a", state=api_pb2.CONTAINER_STATE_RUNNING, init_pid=7,
                          argv=["python3", "-c", "x" * 100])
    c.started_at.seconds = 1000
    row = ps_table([c], now=1000 + 7200).splitlines()[1]
    assert " 2h " in row and row.endswith("...") and len(command_text(c.argv, 40)) == 40


def test_command_text_quotes() -> None:
    assert command_text(["sh", "-c", "echo hi"]) == "sh -c 'echo hi'"


def test_status_text_of_an_exited_container() -> None:
    reply = api_pb2.StatusResponse()
    reply.container.id = "c1"
    reply.container.state = api_pb2.CONTAINER_STATE_EXITED
    reply.container.exit_code = 2
    text = status_text(reply, now=0)
    assert "State:    exited(2)" in text and "Exited:   -" in text and "Name:     -" in text


def test_transfer_line() -> None:
    assert transfer_line("restart", 25 * 2**20, 2.0, 100 * 2**20) == (
        "restart  [#####               ]  25%  25M of 100M  12M/s")
    assert transfer_line("checkpoint", 3 * 2**20, 0.0, None) == "checkpoint  3.0M  0B/s"


def test_progress_throttles_and_polls_the_total() -> None:
    now = [0.0]
    polls: list[float] = []

    def total() -> int:
        polls.append(now[0])
        return 10 * 2**20

    out = io.StringIO()
    progress = TransferProgress(out, "checkpoint", total_source=total, clock=lambda: now[0])
    for step in range(1, 21):
        now[0] = step * 0.05  # 20 chunks in a second
        progress(step * 2**19)
    progress.finish()
    drawn = out.getvalue()
    assert drawn.count("\r") <= 12  # at most 10 redraws a second, plus the final one
    assert len(polls) == 1  # Status is asked once a second at most
    assert "100%" in drawn and drawn.endswith("\n")


def test_progress_survives_a_failing_total_source() -> None:
    def broken() -> int:
        raise RuntimeError("daemon went away")

    out = io.StringIO()
    progress = TransferProgress(out, "checkpoint", total_source=broken)
    progress(100)
    progress.finish()
    assert "checkpoint  100B" in out.getvalue()


def test_progress_draws_nothing_when_never_called() -> None:
    out = io.StringIO()
    TransferProgress(out, "restart").finish()
    assert out.getvalue() == ""


@pytest.mark.parametrize("text, number", [
    ("TERM", 15), ("SIGTERM", 15), ("15", 15), ("term", 15), (" sigkill ", 9), ("HUP", 1),
    ("USR1", int(signal.SIGUSR1)), ("RTMIN+2", int(signal.SIGRTMIN) + 2),
    ("SIGRTMAX", int(signal.SIGRTMAX)),
])
def test_parse_signal(text: str, number: int) -> None:
    assert parse_signal(text) == number


@pytest.mark.parametrize("text", ["", "0", "65", "FOO", "SIGFOO", "RTMIN+99", "-9", "RTMIN+x"])
def test_parse_signal_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_signal(text)


def test_signal_name() -> None:
    assert signal_name(9) == "SIGKILL"
    assert signal_name(int(signal.SIGRTMIN) + 3) == "SIGRTMIN+3"
    assert signal_name(200) == "200"


def test_progress_of_an_operation() -> None:
    out = io.StringIO()
    progress = TransferProgress(out, "migrate")
    progress.show_operation(api_pb2.Operation(phase="sending image", bytes_done=2**20,
                                              bytes_total=4 * 2**20))
    progress.finish()
    assert out.getvalue() == "\rmigrate: sending image  1.0M of 4.0M (25%)\x1b[K\n"


def test_command_column_stays_on_one_line() -> None:
    from ckptd_client.render import command_text
    text = command_text(["python3", "-c", "import time\nwhile 1:\n    time.sleep(1)"], 40)
    assert "\n" not in text and len(text) <= 40
