"""ckptctl: the command line of ckptd, built on the client library.

The command line (argparse) and the one place where failures become a single
``ckptctl: error: ...`` line on stderr and an exit code; the commands
themselves are in ``commands``. The exit codes, which scripts may rely on,
are listed (once) in ``exitcodes``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

import structlog

from . import commands, exitcodes
from .address import DEFAULT_SOCKET
from .commands import CommandError, Context
from .errors import ClientError
from .signals import parse_signal

# The exit-code table is written once, in exitcodes; it is part of this
# module's documentation too.
__doc__ = f"{__doc__}\n{exitcodes.__doc__}"

PROG = "ckptctl"

# The default RPC deadline of short calls; transfers have none.
DEFAULT_TIMEOUT = 30.0

_MAIN_EXAMPLES = """\
examples:
  ckptctl run --name web -- python3 -m http.server 8000
  ckptctl ps -a
  ckptctl checkpoint web -o web.img --leave-running
  ckptctl restart -i web.img --name web2
  ckptctl checkpoint web -o - | ssh other ckptctl restart -i -
  ckptctl --address 10.0.0.2:7443 --tls-cert me.pem --tls-key me.key --tls-ca ca.pem ps
  ckptctl image inspect web.img --json

global options go before the command; --json is also accepted after it.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Control ckptd: run containers, checkpoint them, restart and migrate them.",
        epilog=_MAIN_EXAMPLES + "\n" + exitcodes.help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--address", metavar="ADDR",
        help="daemon address: a unix socket path, or host:port for TCP with mutual TLS "
             f"(default: $CKPTD_ADDRESS, else {DEFAULT_SOCKET})")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate for TCP (mutual TLS)")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--tls-ca", metavar="PEM",
                        help="CA that signed the daemon's certificate (default: system CAs)")
    parser.add_argument("--insecure", action="store_true",
                        help="plain TCP without TLS; only allowed to a loopback address")
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="S",
                        help="deadline of short calls in seconds, 0 for none (default: %(default)g); "
                             "transfers (logs, checkpoint, restart, migrate) have none")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def _command(sub: argparse._SubParsersAction, name: str, summary: str, handler: Callable[[Context], int],
             examples: str = "", aliases: Sequence[str] = (),
             usage: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help=summary, usage=usage, description=summary[:1].upper() + summary[1:] + ".", aliases=list(aliases),
        epilog=("examples:\n" + examples) if examples else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # SUPPRESS: absent here, the global --json (before the command) stands.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable JSON output")
    p.set_defaults(handler=handler)
    return p


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "run", "start a command as the init of a new container", commands.cmd_run,
                 "  ckptctl run -- sleep 1000\n"
                 "  ckptctl run --name web --net new -e PORT=8000 -- python3 -m http.server\n"
                 "  ckptctl run --tty -- bash -l\n",
                 usage=f"{PROG} run [-h] [--json] [--name N] [-e K=V ...] [--cwd DIR]\n"
                       "                   [--hostname H] [--net {host,new}] [-t] [--] CMD [ARGS...]")
    p.add_argument("--name", default="", help="unique name (an id is always assigned too)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                   help="environment variable, repeatable (default: a minimal environment)")
    p.add_argument("--cwd", default="", metavar="DIR", help="working directory (default: /)")
    p.add_argument("--hostname", default="", metavar="H",
                   help="hostname in the container's UTS namespace (default: name or id)")
    p.add_argument("--net", choices=("host", "new"), default="host",
                   help="share the host network, or a new namespace with loopback (default: host)")
    p.add_argument("-t", "--tty", action="store_true", help="give the container a pseudo-terminal")
    # REMAINDER: everything from the command on is the command's, options
    # included (`run ls -l`); a leading "--" is dropped by the handler.
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD [ARGS...]",
                   help="the command to run")


def _add_ps(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "ps", "list containers (running ones unless -a)", commands.cmd_ps,
                 "  ckptctl ps\n  ckptctl ps -a --json\n", aliases=("list",))
    p.add_argument("-a", "--all", action="store_true", help="include exited and lost containers")


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "status", "show a container, or the daemon and its running operations",
                 commands.cmd_status, "  ckptctl status web\n  ckptctl status\n")
    p.add_argument("id", nargs="?", metavar="ID", help="container id or name (none: the daemon)")


def _add_freeze_thaw(sub: argparse._SubParsersAction) -> None:
    for name, verb, handler in (("freeze", "freeze every task of", commands.cmd_freeze),
                                ("thaw", "thaw", commands.cmd_thaw)):
        p = _command(sub, name, f"{verb} a container", handler, f"  ckptctl {name} web\n")
        p.add_argument("id", metavar="ID", help="container id or name")
        p.add_argument("--timeout", dest="op_timeout", type=_seconds, default=10.0, metavar="S",
                       help="how long the daemon waits for the cgroup (default: %(default)g)")


def _add_kill(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "kill", "send a signal to a container's init", commands.cmd_kill,
                 "  ckptctl kill web\n  ckptctl kill -s KILL web\n"
                 "  ckptctl kill --timeout 10 web   (TERM, then KILL after 10 s)\n")
    p.add_argument("id", metavar="ID", help="container id or name")
    p.add_argument("-s", "--signal", type=_signal, default=15, metavar="SIG",
                   help="signal name or number: TERM, SIGTERM, 15 (default: TERM)")
    p.add_argument("--timeout", dest="op_timeout", type=_seconds, default=0.0, metavar="S",
                   help="if > 0, SIGKILL the whole container when still running after S seconds")


def _add_rm(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "rm", "delete an exited container (its record, cgroup and logs)",
                 commands.cmd_rm, "  ckptctl rm web\n  ckptctl rm -f web\n", aliases=("delete",))
    p.add_argument("id", metavar="ID", help="container id or name")
    p.add_argument("-f", "--force", action="store_true", help="SIGKILL it first if it still runs")


def _add_logs(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "logs", "print a container's output", commands.cmd_logs,
                 "  ckptctl logs web\n  ckptctl logs -f web | grep ERROR\n")
    p.add_argument("id", metavar="ID", help="container id or name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output")


def _add_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "checkpoint", "checkpoint a container or a process tree into an image file",
                 commands.cmd_checkpoint,
                 "  ckptctl checkpoint web -o web.img\n"
                 "  ckptctl checkpoint web -o web.img --leave-running\n"
                 "  ckptctl checkpoint --pid 4242 -o tree.img\n"
                 "  ckptctl checkpoint --pid 4242 -o tree.img --external file:/tmp/shared.log\n"
                 "  ckptctl checkpoint web -o - | gzip > web.img.gz\n"
                 "FILE appears only once the whole image arrived; a failed checkpoint leaves\n"
                 "no file behind. Without --leave-running the container is killed afterwards.\n"
                 "A tree that shares resources with processes outside it (an open file,\n"
                 "shared memory ...) is refused with a list naming each one; accept one with\n"
                 "--external NAME to checkpoint it as a private copy.\n")
    p.add_argument("id", nargs="?", metavar="ID", help="container id or name")
    p.add_argument("--pid", type=_pid, help="checkpoint this host process tree instead")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="image file to write, - for stdout")
    p.add_argument("--leave-running", action="store_true",
                   help="resume the tree after the checkpoint instead of killing it")
    p.add_argument("--external", action="append", default=[], metavar="NAME",
                   help="accept a resource shared with a process outside the tree, named as a "
                        "refused checkpoint lists it (file:PATH, mem:MAJ:MIN:INO, fdtable:PID, "
                        "fs:PID, vm:PID, sighand:PID); it is checkpointed as a private copy: "
                        "a file is reopened at restore with its offset, memory is copied. "
                        "Repeat for each; a name that matches nothing is an error")


def _add_restart(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "restart", "restart a container from an image file", commands.cmd_restart,
                 "  ckptctl restart -i web.img\n  ckptctl restart -i web.img --name web2\n"
                 "  gunzip -c web.img.gz | ckptctl restart -i -\n")
    p.add_argument("-i", "--input", required=True, metavar="FILE",
                   help="image file to read, - for stdin")
    p.add_argument("--name", default="", help="name of the new container (default: the image's)")


def _add_migrate(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "migrate", "move a container to another daemon", commands.cmd_migrate,
                 "  ckptctl migrate web --to 10.0.0.2:7443\n"
                 "The source daemon connects to the destination itself, with the client\n"
                 "certificate of its own configuration. Prints the id on the destination.\n")
    p.add_argument("id", metavar="ID", help="container id or name")
    p.add_argument("--to", required=True, metavar="ADDRESS",
                   help="destination daemon: unix socket path or host:port")
    p.add_argument("--leave-running", action="store_true",
                   help="keep the source container running (a copy, not a move)")


def _add_image(sub: argparse._SubParsersAction) -> None:
    image = sub.add_parser("image", help="work with image files (no daemon needed)",
                           description="Work with image files locally; no daemon needed.")
    image_sub = image.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    p = _command(image_sub, "inspect", "decode an image file and describe what it holds",
                 commands.cmd_image_inspect,
                 "  ckptctl image inspect web.img\n  ckptctl image inspect --json - < web.img\n"
                 "exits with 9 when the image is bad, naming the record and offset.\n")
    p.add_argument("file", metavar="FILE", help="image file, - for stdin")


_COMMANDS = (_add_run, _add_ps, _add_status, _add_freeze_thaw, _add_kill, _add_rm, _add_logs,
             _add_checkpoint, _add_restart, _add_migrate, _add_image)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def _signal(text: str) -> int:
    try:
        return parse_signal(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _pid(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"not a pid: {text!r}")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ckptctl with ``argv`` (default: the process's); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else exitcodes.USAGE
    _library_logs_to_stderr()
    ctx = Context(args, stdout=sys.stdout, stderr=sys.stderr, stdin=sys.stdin)
    try:
        return args.handler(ctx)
    except ClientError as e:
        return _fail(ctx.stderr, str(e), exitcodes.for_error(e))
    except CommandError as e:
        return _fail(ctx.stderr, str(e), e.exit_code)
    except BrokenPipeError:
        _silence_stdout()
        return exitcodes.BROKEN_PIPE
    except OSError as e:
        return _fail(ctx.stderr, _os_message(e), exitcodes.FAILED)
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED
    finally:
        ctx.close()


def _library_logs_to_stderr() -> None:
    # ckptd's modules (e.g. the image reader behind `image inspect`) log with
    # structlog, whose default prints to stdout: that would corrupt --json or
    # an image written to stdout. Warnings and errors only, and on stderr.
    structlog.configure(logger_factory=lambda *_: _StderrLogger(),
                        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


class _StderrLogger:
    """Writes to whatever sys.stderr is at the time (tests swap it)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _fail(stderr: TextIO, message: str, code: int) -> int:
    # The error is one line, whatever the daemon sent: a script reads it as
    # one message. A report under it (lines indented by the daemon, e.g. the
    # leaks of a refused checkpoint) follows, one item per line.
    lines = message.strip().splitlines()
    cut = next((i for i, text in enumerate(lines) if i and text[:1].isspace()), len(lines))
    line = " ".join(" ".join(lines[:cut]).split()) or "failed"
    stderr.write(f"{PROG}: error: {line}\n")
    for detail in lines[cut:]:
        if detail.strip():
            stderr.write(f"  {detail.strip()}\n")
    stderr.flush()
    return code


def _os_message(e: OSError) -> str:
    if e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return e.strerror or str(e)


def _silence_stdout() -> None:
    # The reader went away; point stdout at /dev/null so that the interpreter's
    # final flush does not report the same broken pipe again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # stdout is not a real file (tests): nothing will flush into a pipe


if __name__ == "__main__":
    sys.exit(main())
