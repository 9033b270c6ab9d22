"""Items produced by a thread of their own, a bounded number ahead of their
consumer: image bytes from a worker while the gRPC stream sends the last
ones, or from a client while the worker writes the last ones into a task.

``read_ahead(produce, ...)`` runs ``produce(put)`` on a thread; ``put(item)``
blocks while the queue is full and returns False once the consumer is gone
(or ``halt`` is set): the producer should then stop. What ``produce``
raises is raised in the consumer, after the items before it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

Put = Callable[[Any], bool]


def read_ahead(produce: Callable[[Put], None], *, depth: int, poll: float, name: str,
               halt: threading.Event | None = None, join: bool = True) -> Iterator[Any]:
    """The items ``produce`` puts, in order. ``poll``: how soon an abandoned
    producer notices. ``join``: wait for the producer thread when the
    consumer stops (not when it may be blocked outside ``put``, waiting for
    input that never comes: it then ends at its next item)."""
    ahead: queue.Queue[tuple[str, Any]] = queue.Queue(depth)
    gone = threading.Event()

    def put_raw(entry: tuple[str, Any]) -> bool:
        while not (gone.is_set() or (halt is not None and halt.is_set())):
            try:
                ahead.put(entry, timeout=poll)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            produce(lambda item: put_raw(("item", item)))
            put_raw(("end", None))
        except BaseException as e:  # noqa: BLE001 - raised again in the consumer
            put_raw(("failed", e))

    producer = threading.Thread(target=run, name=name, daemon=True)
    producer.start()
    try:
        while True:
            kind, item = ahead.get()
            if kind == "end":
                return
            if kind == "failed":
                raise item
            yield item
    finally:
        gone.set()
        if join:
            producer.join()
