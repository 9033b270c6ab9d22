"""``ckptd``: the daemon's entry point.

Starts the gRPC server on a private unix socket, the authenticating front on
the public one (and TCP with mutual TLS when asked), recovers the containers
of an earlier run, tells systemd it is ready, and on SIGTERM/SIGINT shuts down
gracefully. Containers keep running when the daemon stops: they belong to
their shims and cgroups, not to this process.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import threading
from concurrent import futures

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ckptd import __version__, logs
from ckptd.containers.manager import ContainerManager
from ckptd.containers.operations import Operations
from ckptd.containers.worker import WorkerPool
from ckptd.errors import CkptdError
from ckptd.kernel.process import set_child_subreaper
from ckptd.server import config as configuration
from ckptd.server.auth import LocalFiles, PeerTable, UnixFront
from ckptd.server.notify import notify
from ckptd.server.service import Servicer, add_to_server, daemon_info
from ckptd.v1 import api_pb2

log = structlog.get_logger(__name__)

# Image chunks are ~1 MiB; leave room for framing and for bigger client chunks.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Worker threads for RPCs. Long streams (logs -f, checkpoints) hold one each.
RPC_WORKERS = 32
SHUTDOWN_GRACE = 5.0  # seconds for calls in flight to finish on SIGTERM
SERVICE_NAME = api_pb2.DESCRIPTOR.services_by_name["Ckptd"].full_name
# glibc gives freed blocks of over 128 KiB back to the kernel at once (munmap,
# or trimming the heap top past twice that), so every 1 MiB image chunk the
# daemon read, framed and handed to gRPC came in fresh pages, each faulted and
# zeroed again: measured, a 1 GiB checkpoint streamed in 1.19 s with that and
# 0.88-0.93 s without. Serve such blocks from the heap and keep this much
# free there (per malloc arena; a few chunks are in flight at a time).
MALLOC_MMAP_THRESHOLD = 32 << 20   # glibc's largest allowed value
MALLOC_TRIM_THRESHOLD = 64 << 20
MALLOC_TOP_PAD = 16 << 20
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3   # <malloc.h>


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ckptd",
        description="Checkpoint/restart daemon: runs containers in their own namespaces and "
                    "freezer cgroups, and checkpoints and restarts them. Serves gRPC on a "
                    "unix socket (and optionally TCP with mutual TLS).",
        epilog="Several daemons can run side by side with different --socket, --state-dir "
               "and --cgroup-root. Flags override the config file.")
    p.add_argument("--version", action="version", version=f"ckptd {__version__}")
    configuration.add_arguments(p)
    return p.parse_args(argv)


class Daemon:
    def __init__(self, cfg: configuration.Config) -> None:
        self.cfg = cfg
        self.peers = PeerTable()
        self.local_files = LocalFiles()
        self.operations = Operations()
        self.private_dir = cfg.state_dir / "run"
        self.manager: ContainerManager | None = None
        self.workers: WorkerPool | None = None
        self.server: grpc.Server | None = None
        self.front: UnixFront | None = None
        self.stopped = threading.Event()

    def start(self) -> None:
        cfg = self.cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.private_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.private_dir, 0o700)
        set_child_subreaper()
        self.manager = ContainerManager(cfg.state_dir, cfg.cgroup_root, freezer=cfg.freezer)
        self.manager.recover()   # logs containers_recovered with a count per state
        self.workers = WorkerPool()

        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        server = grpc.server(futures.ThreadPoolExecutor(RPC_WORKERS, thread_name_prefix="rpc"),
                             options=options)
        info = daemon_info(self.manager, str(cfg.state_dir), cfg.cgroup_root)
        add_to_server(Servicer(self.manager, self.operations, self.workers, self.peers, info,
                               self.local_files), server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

        backend = self.private_dir / "grpc.sock"
        backend.unlink(missing_ok=True)
        server.add_insecure_port(f"unix:{backend}")
        if cfg.listen:
            if cfg.insecure:
                log.warning("tcp_insecure", listen=cfg.listen,
                            detail="plain TCP: every local user can call the daemon as root")
                server.add_insecure_port(cfg.listen)
            else:
                # config.py refuses --listen without all three outside loopback.
                assert cfg.tls_key and cfg.tls_cert and cfg.tls_client_ca
                creds = grpc.ssl_server_credentials(
                    [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
                    root_certificates=cfg.tls_client_ca.read_bytes(),
                    require_client_auth=True)
                server.add_secure_port(cfg.listen, creds)
            log.info("tcp_listening", listen=cfg.listen, tls=not cfg.insecure)
        server.start()
        self.server = server
        self.front = UnixFront(cfg.socket, backend, self.peers, cfg.socket_group,
                               files=self.local_files)
        self.front.start()
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving on {cfg.socket}")
        log.info("daemon_ready", version=__version__, pid=os.getpid(), socket=str(cfg.socket),
                 state_dir=str(cfg.state_dir), cgroup_root=cfg.cgroup_root,
                 freezer=self.manager.backend_name)

    def stop(self) -> None:
        notify("STOPPING=1")
        log.info("daemon_stopping")
        if self.front is not None:
            self.front.stop()
        if self.server is not None:
            self.server.stop(SHUTDOWN_GRACE).wait()
        if self.workers is not None:
            self.workers.close()
        if self.manager is not None:
            self.manager.close()
        (self.private_dir / "grpc.sock").unlink(missing_ok=True)
        log.info("daemon_stopped")


def keep_freed_memory() -> None:
    """Tune malloc for streaming images (see MALLOC_MMAP_THRESHOLD)."""
    libc = ctypes.CDLL(None)
    for param, value in ((_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD),
                         (_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD),
                         (_M_TOP_PAD, MALLOC_TOP_PAD)):
        if not libc.mallopt(param, value):
            log.warning("mallopt_refused", param=param, value=value)  # only slower


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = configuration.from_args(args)
    except CkptdError as e:
        print(f"ckptd: error: {e}", file=sys.stderr)
        return 2
    logs.configure_daemon(cfg.log_level, cfg.log_format)
    keep_freed_memory()
    if os.geteuid() != 0:
        print("ckptd: error: the daemon must run as root (it creates namespaces and cgroups "
              "and traces processes)", file=sys.stderr)
        return 1
    daemon = Daemon(cfg)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        daemon.start()
    except CkptdError as e:
        log.error("daemon_start_failed", error=str(e))
        daemon.stop()
        return 1
    while not stop.wait(1.0):  # a timed wait keeps signal handlers running promptly
        pass
    daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
