"""The daemon's Python children import the daemon's own ckptd, whatever
directory the daemon was started in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ckptd
from ckptd.containers import children

OUR_CKPTD = str(Path(ckptd.__file__).resolve())
WHERE = "import ckptd, os; print(os.path.realpath(ckptd.__file__))"


def decoy_checkout(tmp_path: Path) -> Path:
    (tmp_path / "ckptd").mkdir()
    (tmp_path / "ckptd" / "__init__.py").write_text("")
    return tmp_path


def where_ckptd(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def test_argv_keeps_the_current_directory_off_the_path() -> None:
    assert children.python_argv("ckptd.engine.worker") == [
        sys.executable, "-P", "-m", "ckptd.engine.worker"]


def test_a_child_started_in_another_checkout_imports_ours(tmp_path: Path) -> None:
    cwd = decoy_checkout(tmp_path)
    plain = [sys.executable, "-c", WHERE]
    # What went wrong: a plain child takes the package in its current directory.
    assert where_ckptd(plain, cwd, dict(os.environ)) == str(cwd / "ckptd" / "__init__.py")
    ours = [*children.python_argv("unused")[:2], "-c", WHERE]   # the same flags
    assert where_ckptd(ours, cwd, children.python_env()) == OUR_CKPTD


def test_pythonpath_names_our_root_only_when_needed(tmp_path: Path, monkeypatch) -> None:
    base = {"PYTHONPATH": "/somewhere/else", "X": "1"}
    # A source tree or an editable install: our root goes first.
    monkeypatch.setattr(children, "PACKAGE_ROOT", tmp_path)
    env = children.python_env(base)
    assert env["PYTHONPATH"] == f"{tmp_path}{os.pathsep}/somewhere/else" and env["X"] == "1"
    assert children.python_env({})["PYTHONPATH"] == str(tmp_path)
    # Installed in site-packages: the child finds it there by itself.
    import site
    monkeypatch.setattr(children, "PACKAGE_ROOT", Path(site.getsitepackages()[0]).resolve())
    assert children.python_env(base) == base
