"""Fixtures for integration tests: a real ckptd per test, always cleaned up.

The ``daemon`` fixture starts ``ckptd`` as a subprocess (see harness.py) and
tears everything down when the test ends, also when it fails: it kills and
deletes every container through the API, stops the daemon, removes the cgroup
root from both hierarchies and the temp dir, and fails the test if anything
was left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import CGROUP_MOUNTS, Daemon
from helpers import require, require_root


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="ckptd-t-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _daemon(root: Path, extra: tuple[str, ...] = ()) -> Iterator[Daemon]:
    require_root()
    require(all(m.is_dir() for m in CGROUP_MOUNTS) or any(m.is_dir() for m in CGROUP_MOUNTS),
            "a freezer cgroup hierarchy (v1 freezer or cgroup2)")
    d = Daemon(root, extra)
    d.start()
    try:
        yield d
    finally:
        problems = d.cleanup()
        assert not problems, "cleanup: " + "; ".join(problems) + "\n" + d.log()


@pytest.fixture
def daemon(tmp_short: Path) -> Iterator[Daemon]:
    yield from _daemon(tmp_short)


@pytest.fixture
def daemon_factory(tmp_short: Path):
    """Start daemons with extra flags; all are cleaned up at the end."""
    made: list[Iterator[Daemon]] = []

    def make(*extra: str, name: str = "d") -> Daemon:
        root = tmp_short / f"{name}{len(made)}"
        root.mkdir()
        gen = _daemon(root, extra)
        made.append(gen)
        return next(gen)
    yield make
    errors = []
    for gen in reversed(made):
        try:
            next(gen, None)
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)
