"""Shared test helpers (importable as `helpers`: tests/ is on sys.path).

Tests that need root or a kernel feature call ``require(condition, what)``:
on a developer machine without it they skip and say what is missing; in CI
(CI=true), where the machine has everything, a missing feature is a failure,
never a silent skip.
"""

from __future__ import annotations

import os

import pytest


def require(condition: bool, what: str) -> None:
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI machine lacks {what}: every c/r test must run here")
    pytest.skip(f"needs {what}")


def require_root() -> None:
    require(os.geteuid() == 0, "root (namespaces, cgroups, ptrace)")
