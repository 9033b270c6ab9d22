"""pythreads.py - a Python interpreter with threads keeps all of them across
checkpoint/restore. Run as ``python pythreads.py DIR`` (same protocol as the C
workloads, see wl.h).

Four counting threads each add to their own counter every ~5 ms (time.sleep:
clock_nanosleep, or the GIL's timed futex waits), and one more thread waits on
a threading.Event that is set only after go (a futex wait with no timeout).

Checked after go:
  - every thread's native id (threading.get_native_id) is the one written at
    ready, and /proc/self/task lists exactly those tids
  - every counter is above its value at ready and keeps going up after go
  - the waiting thread wakes when the event is set, not before, and every
    thread can be joined
"""

from __future__ import annotations

import os
import sys
import threading
import time

COUNTERS = 4
NAP = 0.005               # seconds between counts
TICKS_AFTER_GO = 5
JOIN_TIMEOUT = 10.0


def write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class Counting(threading.Thread):
    def __init__(self, index: int, stop: threading.Event) -> None:
        super().__init__(name=f"count-{index}", daemon=True)
        self.value = 0
        self.tid = 0
        self.tid_after = 0        # its native id once it stops, after go
        self.stop_after: int | None = None
        self.stop = stop
        self.started_counting = threading.Event()

    def run(self) -> None:
        self.tid = threading.get_native_id()
        while True:
            self.value += 1
            self.started_counting.set()
            if self.stop_after is not None and self.value >= self.stop_after:
                break
            time.sleep(NAP)
        self.tid_after = threading.get_native_id()


class Waiting(threading.Thread):
    def __init__(self, event: threading.Event) -> None:
        super().__init__(name="waiter", daemon=True)
        self.event = event
        self.tid = 0
        self.tid_after = 0
        self.woke = threading.Event()
        self.waiting = threading.Event()

    def run(self) -> None:
        self.tid = threading.get_native_id()
        self.waiting.set()
        self.event.wait()
        self.tid_after = threading.get_native_id()
        self.woke.set()


def main(directory: str) -> int:
    directory = os.path.abspath(directory)
    sabotage = os.environ.get("WL_SABOTAGE", "0") not in ("", "0")
    stop = threading.Event()
    counters = [Counting(i, stop) for i in range(COUNTERS)]
    released = threading.Event()
    waiter = Waiting(released)
    for t in counters + [waiter]:
        t.start()
    for t in counters:
        t.started_counting.wait()
    waiter.waiting.wait()
    time.sleep(0.05)

    pid = os.getpid()
    main_tid = threading.get_native_id()
    tids = sorted([main_tid, waiter.tid] + [t.tid for t in counters])
    at_ready = [t.value for t in counters]
    print("READY", flush=True)    # before ready appears: a waiter then sees still offsets
    write_atomic(os.path.join(directory, "ready"),
                 f"pid={pid}\ntids={','.join(map(str, tids))}\n"
                 f"counts={','.join(map(str, at_ready))}\n")

    go = os.path.join(directory, "go")
    while not os.path.exists(go):
        time.sleep(0.01)

    failures = []
    now = sorted(int(t) for t in os.listdir("/proc/self/task"))
    if now != tids:
        failures.append(f"/proc/self/task is {now}, was {tids} at ready")
    if threading.get_native_id() != main_tid or os.getpid() != pid:
        failures.append(f"main thread is {threading.get_native_id()} in {os.getpid()}, "
                        f"was {main_tid} in {pid}")
    if waiter.woke.is_set():
        failures.append("the waiting thread woke before the event was set")
    at_go = [t.value for t in counters]
    for i, (before, after) in enumerate(zip(at_ready, at_go)):
        if not after > before:
            failures.append(f"counter {i} is {after} at go, not above {before} at ready")
    for t in counters:
        t.stop_after = t.value + TICKS_AFTER_GO
    if sabotage:
        counters[0].stop_after = counters[0].value
    released.set()
    if not waiter.woke.wait(JOIN_TIMEOUT):
        failures.append("the waiting thread did not wake when the event was set")
    for t in counters + [waiter]:
        t.join(JOIN_TIMEOUT)
        if t.is_alive():
            failures.append(f"thread {t.name} did not finish")
    for i, t in enumerate(counters):
        if t.value < at_go[i] + TICKS_AFTER_GO:
            failures.append(f"counter {i} stopped at {t.value} after go (was {at_go[i]})")
    for t in counters + [waiter]:
        if t.tid_after != t.tid:
            failures.append(f"thread {t.name}: native id {t.tid_after} after go, "
                            f"{t.tid} at ready")

    verdict = "".join(f"FAIL: {f}\n" for f in failures) or "PASS\n"
    write_atomic(os.path.join(directory, "result"), verdict)
    print(verdict, end="", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: pythreads.py DIR")
    sys.exit(main(sys.argv[1]))
