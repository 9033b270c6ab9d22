"""deploy/: the systemd unit, the tmpfiles entry and the example config are
what the issue asks for, and systemd's own tools accept them."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sysconfig
from pathlib import Path

from helpers import require

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "ckptd.service"
TMPFILES = DEPLOY / "ckptd.tmpfiles.conf"
EXAMPLE = DEPLOY / "config.example.toml"


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (a key may repeat), comments dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_waits_for_readiness_and_leaves_containers_alone() -> None:
    service = unit_settings(UNIT.read_text())["Service"]
    assert service["Type"] == ["notify"]           # the daemon sends READY=1 itself
    assert service["NotifyAccess"] == ["main"]
    assert service["Delegate"] == ["yes"]          # its cgroups below its own
    assert service["KillMode"] == ["process"]      # containers outlive a restart
    exec_start = service["ExecStart"][0].split()
    assert Path(exec_start[0]).name == "ckptd"
    assert exec_start[1:] == ["--config", "/etc/ckptd/config.toml"]


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze")
    ckptd = Path(sysconfig.get_path("scripts")) / "ckptd"
    require(ckptd.is_file(), f"an installed ckptd at {ckptd} (pip install .)")
    # What the unit's install comment does: ExecStart = the installed ckptd.
    text = UNIT.read_text().replace("/usr/local/bin/ckptd", str(ckptd))
    assert str(ckptd) in text
    unit = tmp_path / "ckptd.service"
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_tmpfiles_makes_the_runtime_and_state_dirs(tmp_path: Path) -> None:
    require(shutil.which("systemd-tmpfiles") is not None, "systemd-tmpfiles")
    require(os.geteuid() == 0, "root (systemd-tmpfiles sets owners)")
    # Also where no ckptd group exists: the entry must not depend on it.
    r = subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(TMPFILES)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir, state_dir = (tmp_path / "run" / "ckptd").stat(), (tmp_path / "var/lib/ckptd").stat()
    assert stat.S_ISDIR(run_dir.st_mode) and run_dir.st_uid == 0
    assert stat.S_IMODE(state_dir.st_mode) == 0o700 and state_dir.st_uid == 0


def test_example_config_names_every_default() -> None:
    text = EXAMPLE.read_text()
    for key, value in (("socket", "/run/ckptd/ckptd.sock"), ("state_dir", "/var/lib/ckptd"),
                       ("cgroup_root", "ckptd")):
        assert re.search(rf'^{key} = "{re.escape(value)}"$', text, re.M), key

