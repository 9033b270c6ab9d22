"""ckptctl end to end against an in-process fake daemon: output, files, exit codes."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import types
from collections.abc import Iterator

import grpc
import pytest

from ckptd.v1 import api_pb2
from ckptd_client import cli
from ckptd_client.testing import FakeCkptd, fake_daemon


@pytest.fixture
def daemon() -> Iterator[tuple[str, FakeCkptd]]:
    # Not tmp_path: a unix socket path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="ckc") as d:
        path = os.path.join(d, "ckptd.sock")
        with fake_daemon(path) as fake:
            yield path, fake


@pytest.fixture
def fake(daemon: tuple[str, FakeCkptd]) -> FakeCkptd:
    return daemon[1]


@pytest.fixture
def ckptctl(daemon: tuple[str, FakeCkptd]):
    """Run ckptctl against the fake daemon; returns the exit code."""
    def run(*argv: str) -> int:
        return cli.main(["--address", daemon[0], "--timeout", "5", *argv])
    return run


class TtyStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ckptctl: error: ") and "Traceback" not in err
    return lines[0][len("ckptctl: error: "):]


# -- listing and details -----------------------------------------------------------------

def test_ps_table(ckptctl, capsys) -> None:
    assert ckptctl("ps") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "NAME", "STATE", "PID", "TASKS", "RSS", "AGE", "COMMAND"]
    assert out[1].split()[:6] == ["c0ffee01", "web", "running", "4242", "3", "12M"]
    assert out[1].endswith("python3 -m http.server")
    assert out[2].split()[:3] == ["c0ffee02", "cold", "frozen"]
    assert len(out) == 3  # the exited one only with -a


def test_ps_all_shows_exit_states(ckptctl, capsys) -> None:
    assert ckptctl("list", "-a") == 0
    row = capsys.readouterr().out.splitlines()[3].split()
    assert row[:6] == ["c0ffee03", "-", "killed(SIGKILL)", "-", "-", "-"]


def test_ps_json(ckptctl, capsys) -> None:
    assert cli.main(["--json", "--address", "/nonexistent/x.sock", "ps"]) == 6
    capsys.readouterr()
    assert ckptctl("ps", "-a", "--json") == 0  # --json after the command works too
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == ["c0ffee01", "c0ffee02", "c0ffee03"]
    assert rows[0]["init_pid"] == 4242 and rows[0]["state"] == "CONTAINER_STATE_RUNNING"
    assert rows[2]["exit_signal"] == 9 and rows[2]["exit_code"] == 0  # defaults present too


def test_status_of_a_container(ckptctl, capsys, fake) -> None:
    op = api_pb2.Operation(id="op-1", kind=api_pb2.OPERATION_KIND_CHECKPOINT,
                           container_id="c0ffee02", phase="dumping memory",
                           bytes_done=25 * 2**20, bytes_total=100 * 2**20)
    fake.operations.append(op)
    assert ckptctl("status", "cold") == 0
    out = capsys.readouterr().out
    assert "State:    frozen" in out
    assert "Note:     cgroup was found frozen after a daemon restart" in out
    assert "PID:      4343 (in container: 1)" in out
    assert "Operations:" in out
    assert "checkpoint  dumping memory  25M of 100M (25%)" in out


def test_status_of_the_daemon(ckptctl, capsys) -> None:
    assert ckptctl("status") == 0
    out = capsys.readouterr().out
    assert "Freezer:     cgroup2" in out and "Operations: none" in out
    assert ckptctl("--json", "status", "web") == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["container"]["name"] == "web" and reply["operations"] == []


# -- lifecycle -------------------------------------------------------------------------------

def test_run(ckptctl, capsys, fake) -> None:
    assert ckptctl("run", "--name", "nap", "-e", "A=1", "--env", "B=2", "--net", "new", "-t",
                   "--", "sh", "-c", "sleep 1") == 0
    new_id = capsys.readouterr().out.strip()
    req = fake.requests[-1][1]
    assert fake.containers[new_id].name == "nap"
    assert list(req.argv) == ["sh", "-c", "sleep 1"] and list(req.env) == ["A=1", "B=2"]
    assert req.network == api_pb2.NETWORK_MODE_NEW and req.tty
    assert ckptctl("--json", "run", "true") == 0
    assert json.loads(capsys.readouterr().out)["argv"] == ["true"]


@pytest.mark.parametrize("argv, command", [
    (["run", "ls", "-l"], ["ls", "-l"]),
    (["run", "--name", "x", "sleep", "1", "--name", "y"], ["sleep", "1", "--name", "y"]),
    (["run", "--", "echo", "--", "x"], ["echo", "--", "x"]),
    (["run", "--", "--weird"], ["--weird"]),
])
def test_run_command_keeps_its_options(ckptctl, capsys, fake, argv, command) -> None:
    assert ckptctl(*argv) == 0
    assert list(fake.requests[-1][1].argv) == command


def test_name_taken_is_exit_4(ckptctl, capsys) -> None:
    assert ckptctl("run", "--name", "web", "--", "true") == 4
    assert _one_error_line(capsys.readouterr().err) == "name 'web' is taken"


def test_freeze_thaw_rm(ckptctl, capsys, fake) -> None:
    assert ckptctl("freeze", "web", "--timeout", "2") == 0
    assert fake.requests[-1][1].timeout_seconds == 2
    assert ckptctl("freeze", "web") == 4  # already frozen
    assert ckptctl("thaw", "web") == 0
    assert ckptctl("rm", "web") == 4  # still running
    assert ckptctl("rm", "-f", "web") == 0
    assert ckptctl("status", "web") == 3
    out, err = capsys.readouterr()
    assert out.split() == ["c0ffee01", "c0ffee01", "c0ffee01"]
    assert err.count("ckptctl: error:") == 3


@pytest.mark.parametrize("spelling", ["KILL", "SIGKILL", "9", "kill", "sigkill"])
def test_kill_signal_names(ckptctl, capsys, fake, spelling: str) -> None:
    assert ckptctl("kill", "-s", spelling, "--timeout", "1", "web") == 0
    req = fake.requests[-1][1]
    assert (req.signal, req.timeout_seconds) == (9, 1)


def test_kill_default_is_term(ckptctl, fake) -> None:
    assert ckptctl("kill", "web") == 0
    assert fake.requests[-1][1].signal == 15


def test_logs_writes_bytes(ckptctl, capsysbinary) -> None:
    assert ckptctl("logs", "web") == 0
    assert capsysbinary.readouterr().out == b"line one\nline two\n"


# -- exit codes and errors ----------------------------------------------------------------------

@pytest.mark.parametrize("code, exit_code", [
    (grpc.StatusCode.INTERNAL, 1),
    (grpc.StatusCode.UNKNOWN, 1),
    (grpc.StatusCode.INVALID_ARGUMENT, 2),
    (grpc.StatusCode.NOT_FOUND, 3),
    (grpc.StatusCode.FAILED_PRECONDITION, 4),
    (grpc.StatusCode.ALREADY_EXISTS, 4),
    (grpc.StatusCode.PERMISSION_DENIED, 5),
    (grpc.StatusCode.UNAUTHENTICATED, 5),
    (grpc.StatusCode.UNAVAILABLE, 6),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 7),
    (grpc.StatusCode.UNIMPLEMENTED, 8),
])
def test_exit_code_per_status(ckptctl, capsys, fake, code: grpc.StatusCode, exit_code: int) -> None:
    fake.fail["List"] = (code, "it went wrong\nsecond line")
    assert ckptctl("ps") == exit_code
    out, err = capsys.readouterr()
    assert out == ""
    assert _one_error_line(err) == "it went wrong second line"


def test_daemon_down(capsys) -> None:
    assert cli.main(["--address", "/nonexistent/ckptd.sock", "ps"]) == 6
    assert _one_error_line(capsys.readouterr().err) == (
        "cannot reach ckptd at /nonexistent/ckptd.sock: no such socket (is the daemon running?)")


def test_address_from_environment(daemon, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CKPTD_ADDRESS", daemon[0])
    assert cli.main(["ps"]) == 0
    assert "web" in capsys.readouterr().out


def test_insecure_non_loopback_refused(capsys) -> None:
    assert cli.main(["--address", "192.0.2.1:7443", "--insecure", "ps"]) == 2
    assert "only allowed to loopback" in _one_error_line(capsys.readouterr().err)


def test_tcp_without_tls_refused(capsys) -> None:
    assert cli.main(["--address", "192.0.2.1:7443", "ps"]) == 2
    assert "mutual TLS" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["kill", "-s", "NOPE", "web"],
    ["kill", "-s", "99", "web"],
    ["checkpoint", "web"],                       # no -o
    ["checkpoint", "-o", "x.img"],               # neither ID nor --pid
    ["checkpoint", "web", "--pid", "3", "-o", "x.img"],
    ["checkpoint", "--pid", "abc", "-o", "x.img"],
    ["--timeout", "soon", "ps"],
    ["run"],
    ["run", "--"],
    ["run", "--name", "x"],
    ["run", "--net", "bridge", "--", "true"],
    ["image"],
])
def test_usage_errors_exit_2(ckptctl, capsys, argv: list[str]) -> None:
    assert ckptctl(*argv) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_help_documents_exit_codes(capsys) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out and "130" in out and "UNAVAILABLE" in out
    assert cli.main(["checkpoint", "--help"]) == 0
    assert "examples:" in capsys.readouterr().out
    for code in ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "130"):
        assert f"\n    {code} " in cli.__doc__


# What the issue names; the parser may have more, each is checked below too.
ISSUE_COMMANDS = ("run", "ps", "list", "status", "freeze", "thaw", "kill", "rm", "logs",
                  "checkpoint", "restart", "migrate", "image inspect")


def _command_paths() -> list[str]:
    """Every subcommand and alias the parser knows, "image inspect" included."""
    import argparse

    def walk(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found.append(f"{prefix}{name}")
                    found += walk(sub, f"{prefix}{name} ")
        return found
    return walk(cli.build_parser(), "")


def test_every_command_of_the_issue_exists() -> None:
    assert set(ISSUE_COMMANDS) <= set(_command_paths())


@pytest.mark.parametrize("command", _command_paths())
def test_help_everywhere(capsys, command: str) -> None:
    assert cli.main([*command.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ckptctl ") and len(out.splitlines()) > 3, out
    if command != "image":
        assert "examples:" in out, f"ckptctl {command} --help has no examples"


def test_interrupt_is_130_without_traceback(ckptctl, capsys, monkeypatch) -> None:
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("ckptd_client.client.Client.list", interrupted)
    assert ckptctl("ps") == 130
    assert "Traceback" not in capsys.readouterr().err


def test_broken_pipe_is_quiet(ckptctl, capsys, monkeypatch) -> None:
    class ClosedPipe(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert ckptctl("ps") == 141
    assert capsys.readouterr().err == ""


# -- checkpoint ---------------------------------------------------------------------------------

def test_checkpoint_to_file(ckptctl, capsys, fake, tmp_path) -> None:
    dest = tmp_path / "web.img"
    assert ckptctl("checkpoint", "web", "-o", str(dest), "--leave-running") == 0
    assert dest.read_bytes() == fake.image
    assert fake.requests[-1][1].leave_running
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # no progress when stderr is not a terminal
    assert ckptctl("--json", "checkpoint", "--pid", "4242", "-o", str(dest)) == 0
    assert json.loads(capsys.readouterr().out) == {"file": str(dest), "bytes": len(fake.image)}
    assert fake.requests[-1][1].pid == 4242


def test_failed_checkpoint_leaves_no_file(ckptctl, capsys, fake, tmp_path) -> None:
    fake.fail_checkpoint_after = 2 * 2**20
    dest = tmp_path / "web.img"
    assert ckptctl("checkpoint", "web", "-o", str(dest)) == 1
    assert "dumping memory" in _one_error_line(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


def test_failed_checkpoint_keeps_an_older_file(ckptctl, capsys, fake, tmp_path) -> None:
    dest = tmp_path / "web.img"
    dest.write_bytes(b"yesterday's image")
    fake.fail_checkpoint_after = 2**20
    assert ckptctl("checkpoint", "web", "-o", str(dest)) == 1
    assert dest.read_bytes() == b"yesterday's image"
    assert os.listdir(tmp_path) == ["web.img"]


def test_checkpoint_unwritable_destination(ckptctl, capsys, tmp_path, fake) -> None:
    dest = tmp_path / "no" / "such" / "dir.img"
    assert ckptctl("checkpoint", "web", "-o", str(dest)) == 1
    assert _one_error_line(capsys.readouterr().err).startswith(f"cannot write {dest}: ")
    assert not any(name == "Checkpoint" for name, _ in fake.requests)  # nothing was started


def test_checkpoint_to_stdout(ckptctl, capsysbinary, fake) -> None:
    assert ckptctl("checkpoint", "web", "-o", "-") == 0
    out = capsysbinary.readouterr().out
    assert out == fake.image


def test_checkpoint_refuses_a_terminal(ckptctl, capsys, monkeypatch) -> None:
    tty = TtyStringIO()
    monkeypatch.setattr(sys, "stdout", tty)
    assert ckptctl("checkpoint", "web", "-o", "-") == 2
    assert "terminal" in capsys.readouterr().err and tty.getvalue() == ""


def test_checkpoint_progress_on_a_terminal(ckptctl, monkeypatch, fake, tmp_path) -> None:
    fake.operations.append(api_pb2.Operation(
        id="op-1", kind=api_pb2.OPERATION_KIND_CHECKPOINT, container_id="c0ffee01",
        phase="dumping memory", bytes_total=len(fake.image)))
    tty = TtyStringIO()
    monkeypatch.setattr(sys, "stderr", tty)
    assert ckptctl("checkpoint", "web", "-o", str(tmp_path / "web.img")) == 0
    shown = tty.getvalue()
    assert shown.startswith("\rcheckpoint") and shown.endswith("\n")
    assert "100%" in shown and "/s" in shown
    # --json is for machines: no progress even on a terminal.
    tty.truncate(0)
    tty.seek(0)
    assert ckptctl("--json", "checkpoint", "web", "-o", str(tmp_path / "web.img")) == 0
    assert tty.getvalue() == ""


# -- restart and migrate -----------------------------------------------------------------------

def test_restart_from_file(ckptctl, capsys, fake, tmp_path) -> None:
    image = tmp_path / "web.img"
    image.write_bytes(fake.image)
    assert ckptctl("restart", "-i", str(image), "--name", "again") == 0
    new_id = capsys.readouterr().out.strip()
    record = fake.restarts[-1]
    assert record.options_first and record.options.name == "again"
    assert bytes(record.data) == fake.image
    assert fake.containers[new_id].name == "again"


def test_restart_from_stdin(ckptctl, capsys, fake, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(fake.image)))
    assert ckptctl("--json", "restart", "-i", "-") == 0
    assert json.loads(capsys.readouterr().out)["argv"] == ["restored"]
    assert bytes(fake.restarts[-1].data) == fake.image


def test_restart_progress_has_a_percentage(ckptctl, monkeypatch, fake, tmp_path) -> None:
    image = tmp_path / "web.img"
    image.write_bytes(fake.image)
    tty = TtyStringIO()
    monkeypatch.setattr(sys, "stderr", tty)
    assert ckptctl("restart", "-i", str(image)) == 0
    assert "100%" in tty.getvalue() and tty.getvalue().startswith("\rrestart")


def test_restart_missing_file(ckptctl, capsys, tmp_path, fake) -> None:
    assert ckptctl("restart", "-i", str(tmp_path / "none.img")) == 1
    assert _one_error_line(capsys.readouterr().err).startswith("cannot read ")
    assert fake.restarts == []


def test_restart_bad_image_from_daemon(ckptctl, capsys, tmp_path) -> None:
    image = tmp_path / "empty.img"
    image.write_bytes(b"")
    assert ckptctl("restart", "-i", str(image)) == 2
    assert "bad image" in _one_error_line(capsys.readouterr().err)


def test_migrate(ckptctl, capsys, fake) -> None:
    assert ckptctl("migrate", "web", "--to", "10.0.0.2:7443") == 0
    assert capsys.readouterr().out.strip() == "d0ffee01"
    req = fake.requests[-1][1]
    assert (req.id, req.destination, req.leave_running) == ("web", "10.0.0.2:7443", False)


# -- image inspect ---------------------------------------------------------------------------------

@pytest.fixture
def fake_inspect(monkeypatch):
    """Stand in for ckptd.image.inspect, so these tests do not depend on the image format."""
    from ckptd.errors import ImageError

    module = types.ModuleType("ckptd.image.inspect")

    def inspect_image(stream):
        data = stream.read()
        if not data.startswith(b"CKPT"):
            raise ImageError("wrong magic", offset=0, record="preamble")
        return {"bytes": len(data)}

    module.inspect_image = inspect_image
    module.summarize = lambda result: f"image of {result['bytes']} bytes"
    monkeypatch.setitem(sys.modules, "ckptd.image.inspect", module)
    return module


def test_image_inspect(capsys, fake_inspect, tmp_path, monkeypatch) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(b"CKPT" + b"\0" * 6)
    # No daemon anywhere: inspect works locally.
    assert cli.main(["--address", "/nonexistent.sock", "image", "inspect", str(image)]) == 0
    assert capsys.readouterr().out == "image of 10 bytes\n"
    assert cli.main(["image", "inspect", "--json", str(image)]) == 0
    assert json.loads(capsys.readouterr().out) == {"bytes": 10}
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"CKPTxx")))
    assert cli.main(["image", "inspect", "-"]) == 0
    assert capsys.readouterr().out == "image of 6 bytes\n"


def test_image_inspect_bad_image_is_exit_9(capsys, fake_inspect, tmp_path) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(b"garbage")
    assert cli.main(["image", "inspect", str(image)]) == 9
    assert _one_error_line(capsys.readouterr().err) == (
        f"{image}: bad image: wrong magic at record preamble, byte offset 0")
    assert cli.main(["image", "inspect", str(tmp_path / "none.img")]) == 1


def test_image_inspect_real_image_from_stdin(capsys, monkeypatch) -> None:
    from ckptd.image import ImageWriter, new_header
    out = io.BytesIO()
    secret = b"page bytes never shown " * 200
    with ImageWriter(out) as w:
        w.write_header(new_header(container_id="c0ffee", pid=4242))
        w.write_pages(0x7000, secret, vma_id=3)
    for argv, check in ((["image", "inspect", "-"], "summary"),
                        (["image", "inspect", "--json", "-"], "json")):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(out.getvalue())))
        assert cli.main(["--address", "/nonexistent.sock", *argv]) == 0   # no daemon needed
        text = capsys.readouterr().out
        assert "page bytes never shown" not in text
        if check == "summary":
            assert "container c0ffee, pid 4242" in text and "digest   OK" in text
        else:
            result = json.loads(text)
            assert result["header"]["source"]["container_id"] == "c0ffee"
            assert result["pages"]["bytes"] == len(secret) and result["trailer"]["digest_ok"]
            assert [r["type"] for r in result["records"]] == ["PAGES"]


def test_image_inspect_real_module_rejects_garbage(capsys, tmp_path) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(b"definitely not a ckptd image")
    assert cli.main(["image", "inspect", str(image)]) == 9
    assert "bad image" in _one_error_line(capsys.readouterr().err)
