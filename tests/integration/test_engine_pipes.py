"""Pipes between the tasks of a tree come with the IPC work; until then a
tree that holds one is refused before anything is written, naming the pid,
the fd and the pipe, and every process of it runs on untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import kill_and_reap, wait_for
from helpers import require_root

from ckptd.engine import api
from ckptd.errors import UnsupportedError

pytestmark = pytest.mark.root

# A parent writes into a pipe its child reads: after the refused checkpoint
# the child must still get what the parent sends.
PIPE_TREE = r"""
import ctypes, os, sys, time
ready, got = sys.argv[1], sys.argv[2]
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    ctypes.CDLL(None).prctl(1, 9)               # PR_SET_PDEATHSIG: dies with its parent
    os.close(w)
    data = os.read(r, 100)
    open(got, "w").write(data.decode())
    time.sleep(1000)
os.close(r)
open(ready, "w").close()
while not os.path.exists(ready + ".go"):
    time.sleep(0.01)
os.write(w, b"after the refusal")
time.sleep(1000)
"""


def test_a_pipe_between_tasks_is_refused_and_the_tree_runs_on(tmp_path: Path) -> None:
    require_root()
    ready, got = tmp_path / "ready", tmp_path / "got"
    proc = subprocess.Popen([sys.executable, "-c", PIPE_TREE, str(ready), str(got)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    child = 0
    try:
        wait_for(ready.exists, 10, "the tree to start")
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            child = int(f.read().split()[0])
        pipe_fds = {fd for fd in map(int, os.listdir(f"/proc/{proc.pid}/fd"))
                    if os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith("pipe:")}
        assert len(pipe_fds) == 1
        with open(tmp_path / "image", "wb") as f, pytest.raises(UnsupportedError) as e:
            api.checkpoint(proc.pid, f, kill=True)
        message = str(e.value)
        assert f"pid {proc.pid} has fd {pipe_fds.pop()} open on a pipe" in message, message
        assert "cannot be checkpointed yet" in message, message
        for pid in (proc.pid, child):
            with open(f"/proc/{pid}/status") as f:
                assert "TracerPid:\t0\n" in f.read(), f"pid {pid} still traced"
        (tmp_path / "ready.go").touch()
        wait_for(lambda: got.exists() and got.read_text() == "after the refusal", 10,
                 "the child to read what its parent wrote after the refusal")
        assert proc.poll() is None
    finally:
        for pid in (child, proc.pid):
            if pid:
                kill_and_reap(pid)
