"""Shared memory benchmark: a 2-process tree sharing MIB of MAP_SHARED
anonymous memory (every page written, non-zero), checkpointed (killed) and
restored on the host through the in-process engine API.

Run on purpose (not by pytest), as root, from the repository root:

    python tests/bench/bench_sharing.py [--mib 256] [--repeat 3] [--dir /dev/shm]

Prints dump and restore times, the image size against the shared size (the
object's pages must be stored once: image ~ MIB, not 2 x MIB), and the
private bytes the dump found still COW-shared between the two processes.
After each restore it checks from outside that both processes map one
object again and that its contents are the ones written.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent)]

from ckptd.engine import api  # noqa: E402

TREE = r"""
import mmap, os, sys, time
size, ready = int(sys.argv[1]) << 20, sys.argv[2]
m = mmap.mmap(-1, size)                       # MAP_SHARED | MAP_ANONYMOUS
block = bytes(range(1, 256)) * (4096 * 16)    # non-zero, not one repeated page
for off in range(0, size, len(block)):
    m[off:off + len(block)] = block[:size - off]
if os.fork() == 0:
    time.sleep(1000)
open(ready, "w").close()
time.sleep(1000)
"""


def object_of(pid: int) -> tuple[int, str]:
    """(inode, map_files path) of the one big shared anonymous mapping."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if line.endswith("/dev/zero (deleted)"):
            path = f"/proc/{pid}/map_files/{line.split()[0]}"
            return os.stat(path).st_ino, path
    raise AssertionError(f"pid {pid} maps no shared anonymous memory")


def wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in pids):
        if time.monotonic() > deadline:
            raise SystemExit(f"pids {pids} did not go away")
        time.sleep(0.005)


def one_round(mib: int, directory: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        ready, image = Path(tmp) / "ready", Path(tmp) / "image"
        proc = subprocess.Popen([sys.executable, "-c", TREE, str(mib), str(ready)],
                                start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pids = [proc.pid]
        try:
            while not ready.exists():
                if proc.poll() is not None:
                    raise SystemExit("the tree died before ready")
                time.sleep(0.01)
            pids.append(int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
                            .read_text().split()[0]))
            started = time.monotonic()
            with open(image, "wb") as f:
                dumped = api.checkpoint(proc.pid, f, kill=True)
            dump_ms = (time.monotonic() - started) * 1000
            proc.wait(10)
            wait_gone(pids)
            started = time.monotonic()
            with open(image, "rb") as f:
                api.restore(f)
            restore_ms = (time.monotonic() - started) * 1000
            (ino0, path0), (ino1, _) = object_of(pids[0]), object_of(pids[1])
            assert ino0 == ino1, "the two processes map different objects after restore"
            block = bytes(range(1, 256)) * (4096 * 16)
            with open(path0, "rb") as f:
                head = f.read(len(block))
            assert head == block[:len(head)], "the shared memory came back different"
            return {"dump_ms": dump_ms, "restore_ms": restore_ms,
                    "image_mib": image.stat().st_size / (1 << 20),
                    "frozen_ms": dumped.frozen_ms,
                    "cow_shared_mib": dumped.cow_shared_bytes / (1 << 20)}
        finally:
            for pid in reversed(pids):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.poll()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    rounds = [one_round(args.mib, args.dir) for _ in range(args.repeat)]
    print(f"2-process tree sharing {args.mib} MiB of MAP_SHARED memory, image on {args.dir}, "
          f"median of {args.repeat}:")
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        print(f"  {key:15} {statistics.median(values):9.1f}   "
              f"(all: {', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
