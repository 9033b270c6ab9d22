"""Checkpoint/restart benchmark, end to end through the daemon.

Run on purpose (not by pytest), as root, after `pip install .`:

    python tests/bench/bench_cr.py [--repeat 3] [--mib 1024] [--dirs /dev/shm /var/tmp]

For (a) `sleep` and (b) a process holding MIB of touched, non-zero anonymous
memory, in a container of a fresh daemon: checkpoint into a file on each
file system, kill, restart from that file. The client hands the file to the
daemon, whose engine writes and reads it directly; with --stream the image
crosses gRPC instead (the path of remote clients), for comparison. Prints
dump, restore and frozen times, image size, and the throughput of a plain
copy of the same memory (process_vm_readv into a buffer, written to a new
file on the same file system, measured in the same run) so the engine's
figure is also a ratio to what the machine can do. MACHINE.md has CRIU 4.2's
figures on this kind of machine: sleep 37 ms dump / 28 ms restore; 1 GiB
0.56 s / 0.53 s with 513 ms frozen.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "integration")]

from harness import Daemon, wait_for  # noqa: E402

CHUNK = 16 << 20   # plain-copy read size: MACHINE.md's best process_vm_readv range


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t


def anon_ranges(pid: int) -> list[tuple[int, int]]:
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[1].startswith("rw"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


def plain_copy(pid: int, directory: Path) -> tuple[float, int]:
    """Seconds and bytes to copy the anonymous memory of pid into a new file."""
    buf = ctypes.create_string_buffer(CHUNK)
    local = IoVec(ctypes.cast(buf, ctypes.c_void_p), CHUNK)
    total = 0
    path = directory / f"plain-copy-{os.getpid()}"
    began = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for start, end in anon_ranges(pid):
            addr = start
            while addr < end:
                n = min(CHUNK, end - addr)
                remote = IoVec(addr, n)
                local.len = n
                got = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
                if got <= 0:
                    break
                f.write(memoryview(buf)[:got])
                total += got
                addr += got
    elapsed = time.perf_counter() - began
    path.unlink()
    return elapsed, total


def one_round(d: Daemon, argv: list[str], ready, directory: Path, label: str,
              local_files: bool) -> dict:
    with d.client(local_files=local_files) as c:
        ctr = c.run(argv)
        ready(ctr)
        plain = plain_copy(ctr.init_pid, directory) if label != "sleep" else (0.0, 0)
        image = directory / f"bench-{os.getpid()}.img"
        began = time.perf_counter()
        c.checkpoint_to_file(image, ref=ctr.id)
        dump_s = time.perf_counter() - began
        dumped = (d.events("checkpoint_done") or [{}])[-1]
        size = image.stat().st_size
        began = time.perf_counter()
        new = c.restart_from_file(image)
        restore_s = time.perf_counter() - began
        c.kill(new.id, signal=9)
        c.delete(new.id)
        c.delete(ctr.id)
        image.unlink()
    return {"dump_s": dump_s, "restore_s": restore_s, "frozen_ms": dumped.get("frozen_ms"),
            "image_bytes": size, "plain_s": plain[0], "plain_bytes": plain[1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--dirs", nargs="+", default=["/dev/shm", "/var/tmp"])
    p.add_argument("--stream", action="store_true",
                   help="stream images over gRPC instead of handing the daemon the files")
    args = p.parse_args()
    from workloads.workloads import build   # the self-checking workloads' builder
    mem = build("mem1g")
    root = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir="/tmp"))
    d = Daemon(root)
    d.start()
    try:
        def mem_argv(ctrdir: Path) -> list[str]:
            return [str(mem), str(ctrdir), str(args.mib)]

        def mem_ready(ctrdir: Path):
            return lambda ctr: wait_for(lambda: (ctrdir / "ready").exists(), 120, "mem1g ready")
        print("images " + ("streamed over gRPC" if args.stream else "through local files"))
        print(f"{'case':<14}{'fs':<10}{'dump s':>9}{'restore s':>11}{'frozen ms':>11}"
              f"{'image MiB':>11}{'engine GB/s':>13}{'plain GB/s':>12}{'ratio':>7}")
        for directory in map(Path, args.dirs):
            for label in ("sleep", f"{args.mib} MiB"):
                rows = []
                for i in range(args.repeat):
                    ctrdir = root / f"w{i}-{label.replace(' ', '')}-{directory.name}"
                    ctrdir.mkdir()
                    if label == "sleep":
                        rows.append(one_round(d, ["sleep", "1000"], lambda c: None, directory, "sleep",
                                         not args.stream))
                    else:
                        rows.append(one_round(d, mem_argv(ctrdir), mem_ready(ctrdir), directory, label,
                                         not args.stream))
                med = {k: statistics.median([r[k] or 0 for r in rows]) for k in rows[0]}
                gbps = med["image_bytes"] / med["dump_s"] / 1e9
                plain = med["plain_bytes"] / med["plain_s"] / 1e9 if med["plain_s"] else 0
                print(f"{label:<14}{str(directory):<10}{med['dump_s']:>9.3f}{med['restore_s']:>11.3f}"
                      f"{med['frozen_ms']:>11.1f}{med['image_bytes'] / 2**20:>11.1f}{gbps:>13.2f}"
                      f"{plain:>12.2f}{(gbps / plain if plain else 0):>7.2f}")
    finally:
        problems = d.cleanup()
        shutil.rmtree(root, ignore_errors=True)
        if problems:
            print("cleanup:", problems, file=sys.stderr)


if __name__ == "__main__":
    main()
