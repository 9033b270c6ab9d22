from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ckptd.errors import UsageError
from ckptd.server import config


def parse(*argv: str) -> config.Config:
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    return config.from_args(p.parse_args(list(argv)))


def test_defaults_are_sane(monkeypatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG", Path("/nonexistent/ckptd.toml"))
    c = parse()
    assert c.socket == Path("/run/ckptd/ckptd.sock")
    assert c.state_dir == Path("/var/lib/ckptd")
    assert c.cgroup_root == "ckptd" and c.listen == "" and not c.insecure


def test_file_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('socket = "/tmp/x.sock"\ncgroup-root = "fromfile"\nlog_level = "debug"\n')
    c = parse("--config", str(f), "--cgroup-root", "fromflag")
    assert c.socket == Path("/tmp/x.sock")
    assert c.cgroup_root == "fromflag", "flags win over the file"
    assert c.log_level == "debug"


def test_example_config_parses() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "config.example.toml"
    assert parse("--config", str(example)).socket == Path("/run/ckptd/ckptd.sock")
    assert parse("--config", str(example), "--socket", "/tmp/x.sock").socket == Path("/tmp/x.sock")


@pytest.mark.parametrize("content, message", [
    ("nonsense = 1\n", "unknown setting"),
    ("socket = [1\n", "not valid TOML"),
    ("insecure = 'yes'\n", "true or false"),
])
def test_bad_files(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(content)
    with pytest.raises(UsageError, match=message):
        parse("--config", str(f))


@pytest.mark.parametrize("argv, message", [
    (("--cgroup-root", "../escape"), "one plain directory"),
    (("--cgroup-root", "a/b"), "one plain directory"),
    (("--listen", "0.0.0.0:7443"), "mutual TLS"),
    (("--listen", "10.1.2.3:7443", "--insecure"), "loopback"),
    (("--listen", "nonsense"), "HOST:PORT"),
    (("--insecure",), "only makes sense"),
    (("--listen", "127.0.0.1:1", "--tls-cert", "/no", "--tls-key", "/no",
      "--tls-client-ca", "/no"), "does not exist"),
])
def test_bad_flags(argv, message) -> None:
    with pytest.raises(UsageError, match=message):
        parse(*argv)


def test_loopback_insecure_is_allowed() -> None:
    assert parse("--listen", "127.0.0.1:7000", "--insecure").insecure
    assert parse("--listen", "[::1]:7000", "--insecure").insecure
    assert parse("--listen", "localhost:7000", "--insecure").insecure
