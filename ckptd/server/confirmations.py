"""Confirmations of checkpoints: a tree to be killed waits, stopped, until the
caller says it holds the whole image (the ConfirmCheckpoint RPC).

``open(caller)`` makes a single-use token for one Checkpoint call; the call
waits on it (``Confirmation.wait``) once it has said the image is complete;
``confirm(token, caller, size)`` (another RPC, the same caller) delivers the
byte count. A token is only good while its Checkpoint call waits for it.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Callable

from ckptd.errors import NotFoundError, PermissionError_
from ckptd.server.auth import Peer

# How often a waiting checkpoint looks whether its caller is still there.
POLL = 0.1


class Confirmation:
    def __init__(self, token: str, caller: Peer) -> None:
        self.token = token
        self.owner = (caller.kind, caller.uid, caller.name)
        self._sizes: queue.Queue[int] = queue.Queue(1)
        self._delivered = False
        self._lock = threading.Lock()

    def wait(self, timeout: float, caller_waits: Callable[[], bool]) -> int | None:
        """The confirmed byte count; None if none comes within ``timeout``
        or the caller goes away first."""
        deadline = time.monotonic() + timeout
        while caller_waits():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                return self._sizes.get(timeout=min(POLL, left))
            except queue.Empty:
                continue
        return None

    def deliver(self, size: int) -> bool:
        """False if confirmed already: a token is good once."""
        with self._lock:
            if self._delivered:
                return False
            self._delivered = True
        self._sizes.put_nowait(size)
        return True


class Confirmations:
    def __init__(self) -> None:
        self._open: dict[str, Confirmation] = {}
        self._lock = threading.Lock()

    def open(self, caller: Peer) -> Confirmation:
        c = Confirmation(secrets.token_hex(16), caller)
        with self._lock:
            self._open[c.token] = c
        return c

    def close(self, c: Confirmation) -> None:
        with self._lock:
            self._open.pop(c.token, None)

    def confirm(self, token: str, caller: Peer, size: int) -> None:
        with self._lock:
            c = self._open.get(token)
        if c is None:
            raise NotFoundError("no checkpoint waits for this confirmation (it ended, "
                                "timed out, or the token is wrong)")
        if not caller.is_root and (caller.kind, caller.uid, caller.name) != c.owner:
            raise PermissionError_("only the caller that asked for a checkpoint may "
                                   "confirm it")
        if not c.deliver(size):
            raise NotFoundError("this checkpoint was confirmed already")
