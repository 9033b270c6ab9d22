"""Checkpoint confirmations (ckptd/server/confirmations.py): single-use
tokens, good only for the caller that asked and only while the checkpoint
waits; a wait ends at the timeout or when the caller goes away."""

from __future__ import annotations

import threading
import time

import pytest

from ckptd.errors import NotFoundError, PermissionError_
from ckptd.server.auth import Peer
from ckptd.server.confirmations import Confirmations

ALICE = Peer(kind="unix", uid=1000, gid=1000, pid=10)
ALICE_AGAIN = Peer(kind="unix", uid=1000, gid=1000, pid=11)   # another of her processes
BOB = Peer(kind="unix", uid=1001, gid=1001, pid=12)
ROOT = Peer(kind="unix", uid=0, gid=0, pid=1)


def test_the_asking_caller_confirms_once() -> None:
    book = Confirmations()
    c = book.open(ALICE)
    threading.Timer(0.05, book.confirm, (c.token, ALICE_AGAIN, 123)).start()
    assert c.wait(5, lambda: True) == 123
    with pytest.raises(NotFoundError, match="confirmed already"):
        book.confirm(c.token, ALICE, 123)
    book.close(c)
    with pytest.raises(NotFoundError, match="no checkpoint waits"):
        book.confirm(c.token, ALICE, 123)


def test_someone_else_may_not_confirm_but_root_may() -> None:
    book = Confirmations()
    c = book.open(ALICE)
    with pytest.raises(PermissionError_):
        book.confirm(c.token, BOB, 1)
    book.confirm(c.token, ROOT, 7)
    assert c.wait(1, lambda: True) == 7


def test_a_wait_ends_at_its_timeout_or_when_the_caller_goes() -> None:
    book = Confirmations()
    c = book.open(ALICE)
    began = time.monotonic()
    assert c.wait(0.2, lambda: True) is None
    assert 0.2 <= time.monotonic() - began < 1
    gone = threading.Event()
    threading.Timer(0.1, gone.set).start()
    began = time.monotonic()
    assert c.wait(30, lambda: not gone.is_set()) is None
    assert time.monotonic() - began < 1


def test_unknown_tokens() -> None:
    with pytest.raises(NotFoundError):
        Confirmations().confirm("nope", ROOT, 1)
