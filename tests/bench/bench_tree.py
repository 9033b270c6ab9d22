"""Scaling benchmark: process trees of 10, 50, 200 and one 16-thread process.

Run on purpose (not by pytest: pyproject collects test_*.py only), as root:

    python tests/bench/bench_tree.py [--repeat 5] [--sizes 10 50 200] [--mode daemon|engine]
                                     [--phases]

daemon (default): each case runs in a container of a fresh daemon,
checkpointed into a file on /dev/shm (killed), then restarted from it, end
to end through the API as a client sees it. engine: the same in this
process through ckptd.engine.api on host processes (no daemon, no worker).
Every restored tree is then told to go and must report PASS: a fast restore
of a broken tree does not count.

Prints, per case, median (min-max) of dump ms, restore ms, frozen ms (the
daemon's own figure: from freeze to kill) and ms per task for dump and
restore. The per-task figure should fall as the tree grows. --phases adds,
in engine mode, the time of each step (dump: start, collect, write,
finish; restore: make tree, build, fill, finish, release).

MACHINE.md has CRIU 4.2's figures here: 50 processes 136 ms dump / 79 ms
restore / 91 ms frozen; 16 threads 36 / 32 / 5 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent), str(HERE.parent / "integration")]

from harness import Daemon, wait_for  # noqa: E402
from workloads.workloads import Workload, build  # noqa: E402

IMAGE_DIR = Path("/dev/shm")
READY_TIMEOUT = 60.0
RESULT_TIMEOUT = 60.0
THREADS = 16     # what threads.c makes


def case_argv(case: str, ctrdir: Path) -> tuple[list[str], int]:
    """argv and the number of tasks (processes + threads) of one case."""
    if case == "threads":
        return [str(build("threads")), str(ctrdir)], THREADS + 1
    n = int(case)
    return [str(build("fanout")), str(ctrdir), str(n)], n


def check_result(ctrdir: Path, case: str) -> None:
    (ctrdir / "go").touch()
    text = wait_for(lambda: (ctrdir / "result").exists() and (ctrdir / "result").read_text(),
                    RESULT_TIMEOUT, f"the restored {case} to report")
    if not text.startswith("PASS"):
        raise SystemExit(f"restored {case} failed its own checks:\n{text}")


def daemon_round(d: Daemon, case: str, ctrdir: Path) -> dict:
    argv, tasks = case_argv(case, ctrdir)
    image = IMAGE_DIR / f"bench-tree-{os.getpid()}.img"
    with d.client(local_files=True) as c:
        ctr = c.run(argv)
        new = None
        try:
            wait_for(lambda: (ctrdir / "ready").exists(), READY_TIMEOUT, f"{case} ready")
            began = time.perf_counter()
            c.checkpoint_to_file(image, ref=ctr.id)
            dump_s = time.perf_counter() - began
            dumped = (d.events("checkpoint_done") or [{}])[-1]
            began = time.perf_counter()
            new = c.restart_from_file(image)
            restore_s = time.perf_counter() - began
            check_result(ctrdir, case)
        finally:
            image.unlink(missing_ok=True)
            for cid in [x.id for x in (new, ctr) if x is not None]:
                with contextlib.suppress(Exception):
                    c.delete(cid, force=True)
    return {"dump": dump_s * 1000, "restore": restore_s * 1000,
            "frozen": dumped.get("frozen_ms") or 0.0, "tasks": tasks}


class PhaseClock:
    """Wraps engine methods to add up the time spent in each (engine mode)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str, label: str) -> None:
        fn = getattr(owner, name)
        totals = self.totals

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                totals[label] += (time.perf_counter() - t) * 1000
        self.undo.append((owner, name, fn))
        setattr(owner, name, timed)

    def install(self) -> None:
        from ckptd.engine import dump, restore
        for m in ("start", "collect", "write", "finish"):
            self.wrap(dump.DumpSession, m, f"dump.{m}")
        for m in ("_collect_process", "_dump_threads"):
            self.wrap(dump.DumpSession, m, f"dump.collect.{m}")
        self.wrap(restore, "read_tree", "restore.read_tree")
        self.wrap(restore, "_make_tree", "restore._make_tree")
        self.wrap(restore, "_fill_pages", "restore.fill")
        for m in ("create_task", "build", "finish", "release", "_create_threads"):
            self.wrap(restore.RestoreSession, m, f"restore.{m}")

    def take(self) -> dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        return out


def reap_orphans(tasks: int) -> None:
    """The killed tree's members were orphans of ours (we are a child
    subreaper): collect them, so that restore does not wait for their pids
    (PID 1 here reaps only about once a second)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.001)


def engine_round(case: str, ctrdir: Path, clock: PhaseClock | None) -> dict:
    from ckptd.engine import api
    name = "threads" if case == "threads" else "fanout"
    args = () if case == "threads" else (case,)
    _, tasks = case_argv(case, ctrdir)
    image = IMAGE_DIR / f"bench-tree-{os.getpid()}.img"
    restored_pid = 0
    try:
        with Workload.start(name, ctrdir, args=args) as w:
            w.wait_ready(READY_TIMEOUT)
            began = time.perf_counter()
            with open(image, "wb") as f, api.checkpointed(w.pid, f) as cp:
                frozen = cp.finish(kill=True)
            dump_s = time.perf_counter() - began
            w.reap()
            reap_orphans(tasks)
            began = time.perf_counter()
            with open(image, "rb") as f:
                restored_pid = api.restore(f).pid
            restore_s = time.perf_counter() - began
            check_result(ctrdir, case)
            os.waitpid(restored_pid, 0)
            restored_pid = 0
    finally:
        image.unlink(missing_ok=True)
        if restored_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(restored_pid, 9)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(restored_pid, 0)
    row = {"dump": dump_s * 1000, "restore": restore_s * 1000, "frozen": frozen,
           "tasks": tasks}
    if clock is not None:
        row.update(clock.take())
    return row


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--sizes", nargs="+", default=["10", "50", "200"])
    p.add_argument("--no-threads", action="store_true")
    p.add_argument("--mode", choices=("daemon", "engine"), default="daemon")
    p.add_argument("--phases", action="store_true", help="engine mode: time each step")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the engine seizes and recreates processes")
    from ckptd import logs
    logs.configure("warning")
    cases = list(args.sizes) + ([] if args.no_threads else ["threads"])
    build("fanout")
    build("threads")
    root = Path(tempfile.mkdtemp(prefix="ckptd-bench-tree-", dir="/tmp"))
    d = Daemon(root) if args.mode == "daemon" else None
    if args.mode == "engine":
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
    clock = PhaseClock() if args.phases and args.mode == "engine" else None
    if clock:
        clock.install()
    try:
        if d is not None:
            d.start()
        print(f"mode {args.mode}, {args.repeat} rounds, median (min-max), ms")
        print(f"{'case':<12}{'tasks':>6}{'dump':>18}{'restore':>18}{'frozen':>18}"
              f"{'dump/task':>11}{'rest/task':>11}")
        for case in cases:
            rows = []
            # One unmeasured warm-up round: the first pays for imports and caches.
            for i in range(args.repeat + 1):
                ctrdir = root / f"{case}-{i}"
                ctrdir.mkdir()
                row = (daemon_round(d, case, ctrdir) if d is not None
                       else engine_round(case, ctrdir, clock))
                if i:
                    rows.append(row)
            tasks = rows[0]["tasks"]
            label = f"{THREADS} threads" if case == "threads" else f"{case} procs"
            print(f"{label:<12}{tasks:>6}{spread([r['dump'] for r in rows]):>18}"
                  f"{spread([r['restore'] for r in rows]):>18}"
                  f"{spread([r['frozen'] for r in rows]):>18}"
                  f"{statistics.median(r['dump'] for r in rows) / tasks:>11.2f}"
                  f"{statistics.median(r['restore'] for r in rows) / tasks:>11.2f}", flush=True)
            if clock is not None:
                keys = sorted({k for r in rows for k in r if "." in k})
                for k in keys:
                    print(f"    {k:<36}{statistics.median(r.get(k, 0.0) for r in rows):8.1f}")
    finally:
        problems = d.cleanup() if d is not None else []
        shutil.rmtree(root, ignore_errors=True)
        if problems:
            print("cleanup:", problems, file=sys.stderr)


if __name__ == "__main__":
    main()
