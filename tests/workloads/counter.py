"""counter.py - a Python interpreter with a real heap keeps counting across
checkpoint/restore. Run as ``python counter.py DIR`` (same protocol as the C
workloads, see wl.h).

It builds a heap (a dict of 100,000 entries and a list sharing its strings), then
counts: every ~10 ms the counter goes up and is written to DIR/count (fixed width,
pwrite at offset 0 of a file held open, so an observer never sees a half-written
number and the process never has a transient fd).

Checked after go:
  - the counter is at least the value at ready and strictly greater (it kept
    counting through the wait), DIR/count shows it, and it keeps counting
  - the pid is the one written in DIR/ready, the dict is the same object (id)
  - a digest of the heap's contents equals the one computed at ready
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

ENTRIES = 100_000
NAP = 0.01                # seconds: the protocol's polling grain
COUNT_WIDTH = 20          # digits; pwrite of one fixed-size record
TICKS_AFTER_GO = 5


def build_heap() -> tuple[dict[int, str], list[tuple[int, str]]]:
    table = {i: f"value-{i * 7919 % 1_000_003}" for i in range(ENTRIES)}
    items = [(i, table[i]) for i in range(0, ENTRIES, 7)]
    return table, items


def digest(table: dict[int, str], items: list[tuple[int, str]]) -> str:
    h = hashlib.sha256()
    for key in sorted(table):
        h.update(f"{key}={table[key]};".encode())
    for key, value in items:
        h.update(f"{key}:{value};".encode())
    return h.hexdigest()


def write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class Counter:
    def __init__(self, path: str) -> None:
        self.value = 0
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def tick(self) -> None:
        self.value += 1
        os.pwrite(self.fd, f"{self.value:>{COUNT_WIDTH}}\n".encode(), 0)

    def on_disk(self) -> int:
        return int(os.pread(self.fd, COUNT_WIDTH + 1, 0))


def main(directory: str) -> int:
    directory = os.path.abspath(directory)
    sabotage = os.environ.get("WL_SABOTAGE", "0") not in ("", "0")
    table, items = build_heap()
    table_id = id(table)
    expected = digest(table, items)
    counter = Counter(os.path.join(directory, "count"))
    counter.tick()

    pid = os.getpid()
    at_ready = counter.value
    print("READY", flush=True)    # before ready appears: a waiter then sees still offsets
    write_atomic(os.path.join(directory, "ready"),
                 f"pid={pid}\ncount={at_ready}\ndigest={expected}\n")

    go = os.path.join(directory, "go")
    while True:
        counter.tick()
        time.sleep(NAP)
        if os.path.exists(go):
            break
    at_go = counter.value

    if sabotage:
        table[12345] = "sabotaged"

    failures = []
    if not at_go > at_ready:
        failures.append(f"counter {at_go} at go is not above {at_ready} at ready")
    if counter.on_disk() != at_go:
        failures.append(f"DIR/count shows {counter.on_disk()}, the counter is {at_go}")
    for _ in range(TICKS_AFTER_GO):
        counter.tick()
    if counter.value != at_go + TICKS_AFTER_GO or counter.on_disk() != counter.value:
        failures.append(f"counting after go: {counter.value}, on disk {counter.on_disk()}")
    if os.getpid() != pid:
        failures.append(f"pid is {os.getpid()}, was {pid}")
    if id(table) != table_id:
        failures.append("the dict is not the same object")
    if len(table) != ENTRIES:
        failures.append(f"the dict has {len(table)} entries, want {ENTRIES}")
    if (now := digest(table, items)) != expected:
        failures.append(f"heap digest {now}, was {expected}")

    verdict = "".join(f"FAIL: {f}\n" for f in failures) or "PASS\n"
    write_atomic(os.path.join(directory, "result"), verdict)
    print(verdict, end="", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: counter.py DIR")
    sys.exit(main(sys.argv[1]))
