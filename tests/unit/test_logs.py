"""The daemon's log format: JSON lines when stdout is not a terminal (the
journal, a file, a pipe), console lines on a terminal. Checked in a child
process whose stdout is a real pipe, then a real pty."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys

EMIT = ("from ckptd import logs; import structlog; logs.configure_daemon('info', 'auto'); "
        "structlog.get_logger('t').info('probe_event', container='abc', n=3)")


def test_json_lines_off_a_terminal() -> None:
    r = subprocess.run([sys.executable, "-c", EMIT], capture_output=True, text=True,
                       check=True, timeout=60)
    (line,) = r.stdout.splitlines()
    event = json.loads(line)
    assert event["event"] == "probe_event" and event["container"] == "abc" and event["n"] == 3
    assert event["level"] == "info" and event["timestamp"].endswith("Z")


def test_console_lines_on_a_terminal() -> None:
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", EMIT], stdout=slave, stderr=slave,
                                stdin=subprocess.DEVNULL)
        os.close(slave)
        slave = -1
        out = b""
        while select.select([master], [], [], 60)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:   # EIO: the child closed the pty
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(60) == 0
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.decode())   # drop colours
    (line,) = [ln for ln in text.splitlines() if "probe_event" in ln]
    assert not line.lstrip().startswith("{"), "not JSON on a terminal"
    assert "[info" in line and "container=abc" in line and "n=3" in line
