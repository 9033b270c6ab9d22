"""Leak detection cost: how long ``leaks.find_leaks`` takes to scan every
other process of the machine for a one-process tree, as the machine is and
with N extra sleeping processes.

Run on purpose (not by pytest), as root, from the source tree:

    python tests/bench/bench_leaks.py [--extra 500] [--repeat 20]

The tree is a `sleep` and so are the extras, started from the same cwd: the
worst case for the prefilters (same exe, cwd and fd numbers), where every
extra costs a kcmp for fd table, fs and address space. Prints the median and
the best time of each.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ckptd.engine import files, leaks  # noqa: E402


def spawn_sleep(out=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.DEVNULL)


def measure(pid: int, repeat: int) -> tuple[float, float, int]:
    fds, _ = files.dump_files(pid)
    times = []
    scanned = 0
    for _ in range(repeat):
        report = leaks.find_leaks(pid, [pid], [fds])
        assert not report.leaks, report.leaks
        times.append(report.ms)
        scanned = report.scanned
    return statistics.median(times), min(times), scanned


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--extra", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    # Two trees: one holding only /dev/null (no fd of another process can
    # match: none is even read), one holding a file (every fd is readlinked).
    with tempfile.TemporaryFile() as out:
        procs = [spawn_sleep(), spawn_sleep(out)]
    try:
        time.sleep(0.2)
        for label, extra in (("as the machine is", 0), (f"with {args.extra} extra sleeps",
                                                           args.extra)):
            procs += [spawn_sleep() for _ in range(extra)]
            time.sleep(0.5)
            for tree, what in zip(procs[:2], ("/dev/null only", "a file")):
                median, best, scanned = measure(tree.pid, args.repeat)
                print(f"{label}, tree holding {what}: {scanned} user processes scanned, "
                      f"median {median:.2f} ms, best {best:.2f} ms")
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
