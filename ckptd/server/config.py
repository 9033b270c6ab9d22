"""The daemon's settings: defaults, a TOML config file, then command-line flags.

Precedence, lowest first: built-in defaults, the config file (``--config``, or
/etc/ckptd/config.toml if it exists), flags given on the command line. Every
setting is checked here, so the rest of the daemon can trust it.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ckptd.errors import UsageError
from ckptd.logs import FORMATS, LEVELS

DEFAULT_CONFIG = Path("/etc/ckptd/config.toml")
FREEZERS = ("auto", "cgroup2", "cgroup1")
# A cgroup root is one directory name under each hierarchy: no slashes, no dots
# at the start, so it can never climb out of the hierarchy it is put in.
_CGROUP_ROOT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Config:
    socket: Path = Path("/run/ckptd/ckptd.sock")
    socket_group: str = "ckptd"       # group allowed on the socket, if it exists
    state_dir: Path = Path("/var/lib/ckptd")
    cgroup_root: str = "ckptd"
    freezer: str = "auto"
    listen: str = ""                  # HOST:PORT for TCP; empty = off
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    insecure: bool = False            # plain TCP, loopback only
    log_level: str = "info"
    log_format: str = "auto"

    def check(self) -> Config:
        if not _CGROUP_ROOT_RE.match(self.cgroup_root):
            raise UsageError(f"cgroup root {self.cgroup_root!r} must be one plain directory "
                             "name (letters, digits, '_', '-', '.')")
        if self.freezer not in FREEZERS:
            raise UsageError(f"freezer must be one of {', '.join(FREEZERS)}, not {self.freezer!r}")
        if self.log_level not in LEVELS:
            raise UsageError(f"log level must be one of {', '.join(LEVELS)}")
        if self.log_format not in FORMATS:
            raise UsageError(f"log format must be one of {', '.join(FORMATS)}")
        if self.listen:
            host, port = split_host_port(self.listen)
            tls = (self.tls_cert, self.tls_key, self.tls_client_ca)
            if self.insecure:
                if not is_loopback(host):
                    raise UsageError(f"--insecure is only allowed on a loopback address, "
                                     f"not {host!r}; use mutual TLS for remote access")
            elif not all(tls):
                raise UsageError("--listen needs --tls-cert, --tls-key and --tls-client-ca "
                                 "(mutual TLS), or --insecure on a loopback address")
            for path in tls:
                if path is not None and not path.is_file():
                    raise UsageError(f"TLS file {path} does not exist")
        elif self.insecure:
            raise UsageError("--insecure only makes sense with --listen")
        return self


def split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"listen address must be HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from e
    known = {f.name: f for f in fields(Config)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UsageError(f"config file {path}: unknown setting {key!r}")
        out[name] = value
    return out


def _coerce(name: str, value: Any) -> Any:
    default = getattr(Config(), name)
    if name in ("tls_cert", "tls_key", "tls_client_ca", "socket", "state_dir"):
        return Path(value) if value not in (None, "") else None if name.startswith("tls") else default
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageError(f"setting {name} must be true or false")
        return value
    if not isinstance(value, str):
        raise UsageError(f"setting {name} must be a string")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags; every default is None so that only flags given override the file."""
    p.add_argument("--config", type=Path, help=f"TOML config file (default {DEFAULT_CONFIG} if present)")
    p.add_argument("--socket", help="unix socket to serve on (default /run/ckptd/ckptd.sock)")
    p.add_argument("--socket-group", help="group allowed to use the socket, if it exists (default ckptd)")
    p.add_argument("--state-dir", help="where container records and logs live (default /var/lib/ckptd)")
    p.add_argument("--cgroup-root", help="cgroup directory name for this daemon's containers (default ckptd)")
    p.add_argument("--freezer", choices=FREEZERS, help="freezer backend (default auto: cgroup2 if usable)")
    p.add_argument("--listen", metavar="HOST:PORT", help="also serve on TCP (needs mutual TLS)")
    p.add_argument("--tls-cert", help="server certificate (PEM) for --listen")
    p.add_argument("--tls-key", help="server private key (PEM) for --listen")
    p.add_argument("--tls-client-ca", help="CA (PEM) that client certificates must chain to")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="plain TCP without TLS; only on a loopback --listen address")
    p.add_argument("--log-level", choices=LEVELS)
    p.add_argument("--log-format", choices=FORMATS, help="default auto: console on a tty, else JSON")


def from_args(args: argparse.Namespace) -> Config:
    settings: dict[str, Any] = {}
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    if path is not None:
        settings.update(load_file(path))
    for f in fields(Config):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    config = replace(Config(), **{k: _coerce(k, v) for k, v in settings.items()})
    return config.check()
