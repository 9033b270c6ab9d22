"""seccomp filters: read with PTRACE_SECCOMP_GET_FILTER, installed from
inside the task as the very last injected step (after credentials: a filter
may forbid what restore still has to do)."""

from __future__ import annotations

import struct

from ckptd.errors import ImageError
from ckptd.kernel import ptrace, sysnr

MAX_INSNS = 4096   # BPF_MAXINSNS: the kernel refuses longer programs


# Flags that describe how a filter behaves (not how it was installed:
# TSYNC, NEW_LISTENER, WAIT_KILLABLE_RECV have no lasting state we can replay).
REPLAYED_FLAGS = 0x2 | 0x4      # SECCOMP_FILTER_FLAG_LOG | _SPEC_ALLOW


def dump_seccomp(pid: int) -> tuple[list[bytes], list[int]]:
    """Filters and their flags, in install order (the kernel lists newest first)."""
    filters = ptrace.seccomp_filters(pid)
    flags = [ptrace.seccomp_filter_flags(pid, i) & REPLAYED_FLAGS for i in range(len(filters))]
    return list(reversed(filters)), list(reversed(flags))


def check_seccomp(filters) -> None:
    for f in filters:
        if not f or len(f) % 8 or len(f) // 8 > MAX_INSNS:
            raise ImageError(f"seccomp filter of {len(f)} bytes", record="TASK")


def restore_seccomp(batch, filters, flags) -> None:
    flags = list(flags) + [0] * (len(filters) - len(flags))
    for prog, flag in zip(filters, flags):
        code = batch.put(prog, 8)
        fprog = batch.put(struct.pack("<HxxxxxxQ", len(prog) // 8, code))
        batch.call(sysnr.SECCOMP, sysnr.SECCOMP_SET_MODE_FILTER, flag & REPLAYED_FLAGS, fprog,
                   what="install seccomp filter")
