"""Session-wide set-up: the self-checking workloads are built into a
directory of this test session's own (about 1 s of gcc), which is removed
when the session ends, so that a run leaves no build behind in /tmp."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from workloads import workloads

_made: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(workloads.DIR_ENV):
        return   # the caller chose where (and keeps it)
    path = tempfile.mkdtemp(prefix="ckptd-test-workloads-")
    os.chmod(path, 0o755)   # workloads also run as other uids (Workload.start(uid=...))
    os.environ[workloads.DIR_ENV] = path
    workloads.build.cache_clear()
    _made.append(path)


def pytest_unconfigure(config: pytest.Config) -> None:
    for path in _made:
        shutil.rmtree(path, ignore_errors=True)
        if os.environ.get(workloads.DIR_ENV) == path:
            del os.environ[workloads.DIR_ENV]
    _made.clear()
