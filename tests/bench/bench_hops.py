"""Where the time of a checkpoint/restart through the daemon goes, hop by hop.

Run on purpose (not by pytest), as root:

    python tests/bench/bench_hops.py [--repeat 3] [--mib 1024] [--dir /dev/shm]

For a container holding MIB of touched random memory, in a fresh daemon,
each figure is the median of REPEAT rounds (the container is left running
between them):

- worker:  the engine worker alone, its image read from its pipe by the
           daemon's own ``Worker.events()`` in this process and discarded;
- daemon:  a Checkpoint RPC, the client discarding the bytes (worker, pipe,
           daemon, gRPC, the unix front, the client);
- file:    ``checkpoint_to_file`` into DIR (all of the above, plus the file);
- restore: ``restart_from_file`` of that image (read, gRPC, front, daemon,
           worker pipe, page filling), the restored container then killed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from harness import Daemon, wait_for  # noqa: E402

from ckptd.containers.worker import Worker  # noqa: E402


# Seconds for a worker to start and import the engine before it is timed
# (the daemon keeps one started ahead, see WorkerPool).
WORKER_WARMUP = 1.0


def worker_alone(pid: int) -> tuple[float, int]:
    """Seconds and bytes for the engine worker to dump ``pid`` into our pipe."""
    total = 0
    with Worker() as worker:
        worker.use(image_in=False)
        time.sleep(WORKER_WARMUP)
        began = time.perf_counter()
        worker.request({"op": "checkpoint", "pid": pid, "cgroup": None, "freezer": None,
                        "source": {"kind": "host"}})
        dumped = False
        for kind, item in worker.events():
            if kind == "data":
                total += len(item)
            elif "error" in item:
                raise RuntimeError(item["error"])
            dumped = dumped or (kind == "control" and "dumped" in item)
        elapsed = time.perf_counter() - began
        while not dumped:
            dumped = "dumped" in worker.receive(30)
        worker.send({"finish": "resume"})
        while "finished" not in worker.receive(30):
            pass
        worker.wait()
    return elapsed, total


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--dir", default="/dev/shm")
    args = p.parse_args()
    from workloads.workloads import build
    mem = build("mem1g")
    root = Path(tempfile.mkdtemp(prefix="ckptd-hops-", dir="/tmp"))
    d = Daemon(root)
    d.start()
    rows: dict[str, list[float]] = {"worker": [], "daemon": [], "file": [], "restore": []}
    size = 0
    try:
        with d.client() as c:
            ctrdir = root / "w"
            ctrdir.mkdir()
            ctr = c.run([str(mem), str(ctrdir), str(args.mib)])
            wait_for(lambda: (ctrdir / "ready").exists(), 120, "mem1g ready")
            image = Path(args.dir) / f"hops-{os.getpid()}.img"
            for _ in range(args.repeat):
                seconds, size = worker_alone(ctr.init_pid)
                rows["worker"].append(seconds)

                def discard() -> None:
                    for _ in c.checkpoint(ctr.id, leave_running=True):
                        pass
                rows["daemon"].append(timed(discard))
                rows["file"].append(timed(lambda: c.checkpoint_to_file(
                    image, ref=ctr.id, leave_running=True)))

                def restore() -> None:
                    new = c.restart_from_file(image)
                    c.kill(new.id, signal=9)
                    c.delete(new.id)
                rows["restore"].append(timed(restore))
                image.unlink()
            c.kill(ctr.id, signal=9)
            c.delete(ctr.id)
        for name, times in rows.items():
            med = statistics.median(times)
            print(f"{name:<8} {med:7.3f} s  {size / med / 1e9:5.2f} GB/s   "
                  f"(runs: {', '.join(f'{t:.3f}' for t in times)})")
    finally:
        problems = d.cleanup()
        shutil.rmtree(root, ignore_errors=True)
        if problems:
            print("cleanup:", problems, file=sys.stderr)


if __name__ == "__main__":
    main()
