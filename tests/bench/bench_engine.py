"""Dump and restore figures of the engine, next to a plain copy.

    python tests/bench/bench_engine.py [MiB] [--rounds N] [--no-mem]

For `sleep 1000`, the threads workload (16 pthreads) and the mem1g workload (MiB of touched random anonymous
memory, default 1024): checkpoint with kill into an image on /dev/shm,
restore with the same pid (in process, target host), and print wall times
(dump, restore, frozen), and the dump into /dev/null (the engine's own
cost: on this VM a fresh tmpfs file's page allocation varies 2-5x from run
to run and dominates the 1 GiB figures). The reference "plain copy" is process_vm_readv of
the same memory in 16 MiB slices written to a fresh /dev/shm file: what a
dumper that does nothing else could reach. CRIU 4.2 here: sleep 37/28 ms,
16 threads 36/32 ms, 1 GiB 0.56/0.53 s (MACHINE.md).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptd.engine import api  # noqa: E402
from ckptd.kernel import mem, proctask  # noqa: E402
from workloads.workloads import Workload  # noqa: E402

# Per process: two benchmarks at once must not write into one image.
IMAGE = f"/dev/shm/ckptd-bench-image-{os.getpid()}"
SLICE = 16 << 20


def reap(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def cr(pid: int, reap_original) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    # Read-write, as ckptctl creates its image files: the engine prepares it.
    with os.fdopen(os.open(IMAGE, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        with api.checkpointed(pid, f) as cp:
            frozen = cp.finish(kill=True)
    dump = time.perf_counter() - t0
    reap_original()
    t1 = time.perf_counter()
    with open(IMAGE, "rb") as f:
        restored = api.restore(f)
    restore = time.perf_counter() - t1
    assert restored.pid == pid
    return dump, restore, frozen / 1000


def plain_copy(pid: int) -> float:
    spans = [(v.start, v.end) for v in proctask.read_smaps(pid)
             if v.perms.startswith("rw") and not v.path]
    buf = bytearray(SLICE)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    with open(IMAGE + ".plain", "wb", buffering=0) as out:
        for start, end in spans:
            for a in range(start, end, SLICE):
                n = min(SLICE, end - a)
                mem.read_into(pid, a, view[:n])
                out.write(view[:n])
                total += n
    elapsed = time.perf_counter() - t0
    os.unlink(IMAGE + ".plain")
    return total / elapsed / 1e9


def dump_to_null(pid: int) -> float:
    """The engine's own cost: the whole dump into /dev/null, task resumed."""
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as f:
        with api.checkpointed(pid, f) as cp:
            cp.finish(kill=False)
    return time.perf_counter() - t0


def show(name: str, runs: list[tuple[float, float, float]], extra: str = "") -> None:
    d, r, f = (statistics.median(x) for x in zip(*runs))
    print(f"{name:>14}: dump {d * 1000:8.1f} ms  restore {r * 1000:8.1f} ms  "
          f"frozen {f * 1000:8.1f} ms {extra}")


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 1024
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    os.sched_setaffinity(0, os.sched_getaffinity(0))
    runs = []
    proc = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = proc.pid
    time.sleep(0.05)
    try:
        for i in range(rounds):
            runs.append(cr(pid, proc.wait if i == 0 else (lambda: reap(pid))))
    finally:
        reap(pid)
    show("sleep", runs)

    # 16 pthreads, most of them blocked in syscalls (tests/workloads/threads.c).
    with tempfile.TemporaryDirectory() as tmp, \
            Workload.start("threads", Path(tmp) / "wl") as w:
        w.wait_ready()
        runs = []
        try:
            for i in range(rounds):
                runs.append(cr(w.pid, w.reap if i == 0 else (lambda: reap(w.pid))))
            w.go()
            result = w.result()
        finally:
            reap(w.pid)
        show("16 threads", runs, f"(workload says {result})")
    if "--no-mem" in sys.argv:
        os.unlink(IMAGE)
        return

    with tempfile.TemporaryDirectory() as tmp, \
            Workload.start("mem1g", Path(tmp) / "wl", args=(str(mib),)) as w:
        w.wait_ready(120)
        copy = plain_copy(w.pid)
        null = min(dump_to_null(w.pid) for _ in range(rounds))
        runs = []
        try:
            for i in range(rounds):
                runs.append(cr(w.pid, w.reap if i == 0 else (lambda: reap(w.pid))))
            size = os.path.getsize(IMAGE)
            copy = max(copy, plain_copy(w.pid))   # the first one pays a cold tmpfs
            w.go()
            result = w.result(120)
        finally:
            reap(w.pid)
        d = statistics.median(r[0] for r in runs)
        rs = statistics.median(r[1] for r in runs)
        show(f"{mib} MiB", runs, f"({size / d / 1e9:.2f} GB/s dump, {size / rs / 1e9:.2f} "
             f"GB/s restore; plain copy {copy:.2f} GB/s; workload says {result})")
        print(f"{'':>14}  dump into /dev/null (engine only): {null * 1000:.1f} ms "
              f"({size / null / 1e9:.2f} GB/s)")
    os.unlink(IMAGE)


if __name__ == "__main__":
    try:
        main()
    finally:
        for leftover in (IMAGE, IMAGE + ".plain"):   # also when interrupted
            if os.path.exists(leftover):
                os.unlink(leftover)
