"""Resource limits: read from /proc/PID/limits, set from inside the task
(root here lacks CAP_SYS_RESOURCE: prlimit on another process fails, and a
hard limit can only be lowered)."""

from __future__ import annotations

import struct

import structlog

from ckptd.kernel import proctask, sysnr
from ckptd.v1 import image_pb2

log = structlog.get_logger(__name__)


def dump_rlimits(pid: int) -> list[image_pb2.Rlimit]:
    return [image_pb2.Rlimit(resource=r, soft=s, hard=h)
            for r, (s, h) in sorted(proctask.read_limits(pid).items())]


def restore_rlimits(batch, task: image_pb2.Task, current: dict[int, tuple[int, int]]) -> None:
    for lim in task.rlimits:
        if lim.resource not in current:
            continue
        cur_soft, cur_hard = current[lim.resource]
        hard = min(lim.hard, cur_hard)
        soft = min(lim.soft, hard)
        if (soft, hard) == (cur_soft, cur_hard):
            continue
        if hard < lim.hard:
            log.warning("rlimit_lowered", resource=lim.resource, wanted=lim.hard, got=hard)
        batch.call(sysnr.PRLIMIT64, 0, lim.resource, batch.put(struct.pack("<QQ", soft, hard)),
                   0, what=f"setrlimit({lim.resource})")
