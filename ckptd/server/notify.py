"""systemd readiness notification (sd_notify), written here to avoid a dependency.

With ``Type=notify`` systemd waits for ``READY=1`` on the datagram socket named
by $NOTIFY_SOCKET before it counts the daemon as started. Without that variable
(run by hand, in tests) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd; True if it was sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        # systemd gone or the socket stale: readiness is advisory, and the
        # daemon must start and stop all the same.
        return False
    return True
