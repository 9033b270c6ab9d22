"""Credentials: uids, gids, groups, capabilities, securebits, no_new_privs.

Restored near the end, in the order that keeps the privilege to do the rest:
bounding set, securebits (+ KEEP_CAPS), groups, gids, uids, then capset and
ambient caps; dropping root first would forbid the later steps.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from ckptd.kernel import procfs, sysnr
from ckptd.v1 import image_pb2

LAST_CAP = 63
SECBIT_KEEP_CAPS = 1 << 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def dump_creds(pid: int, probe, status: dict[str, str] | None = None
               ) -> Callable[[], image_pb2.Creds]:
    """From /proc now; securebits from ``probe``: call the result once it has run."""
    st = status or procfs.read_status(pid)
    creds = image_pb2.Creds(
        uids=[int(x) for x in st["Uid"].split()], gids=[int(x) for x in st["Gid"].split()],
        groups=[int(x) for x in st.get("Groups", "").split()],
        cap_inh=int(st["CapInh"], 16), cap_prm=int(st["CapPrm"], 16),
        cap_eff=int(st["CapEff"], 16), cap_bnd=int(st["CapBnd"], 16),
        cap_amb=int(st.get("CapAmb", "0"), 16))
    bits = probe.ask(sysnr.PRCTL, sysnr.PR_GET_SECUREBITS, 0, 0, 0, 0, what="securebits")

    def answer() -> image_pb2.Creds:
        creds.securebits = bits.result
        return creds
    return answer


def restore_creds(batch, c: image_pb2.Creds, current_bnd: int) -> None:
    for cap in range(LAST_CAP + 1):
        if current_bnd >> cap & 1 and not c.cap_bnd >> cap & 1:
            batch.call(sysnr.PRCTL, sysnr.PR_CAPBSET_DROP, cap, 0, 0, 0,
                       what=f"drop cap {cap} from the bounding set")
    if c.securebits:
        batch.call(sysnr.PRCTL, sysnr.PR_SET_SECUREBITS, c.securebits | SECBIT_KEEP_CAPS,
                   0, 0, 0, what="set securebits")
    else:
        batch.call(sysnr.PRCTL, sysnr.PR_SET_KEEPCAPS, 1, 0, 0, 0, what="keep caps")
    groups = list(c.groups)
    batch.call(sysnr.SETGROUPS, len(groups),
               batch.put(struct.pack(f"<{len(groups)}I", *groups)) if groups else 0,
               what="setgroups")
    batch.call(sysnr.SETRESGID, *c.gids[:3], what="setresgid")
    batch.call(sysnr.SETRESUID, *c.uids[:3], what="setresuid")
    header = batch.put(struct.pack("<Ii", _LINUX_CAPABILITY_VERSION_3, 0))
    data = batch.put(struct.pack("<6I", c.cap_eff & 0xFFFFFFFF, c.cap_prm & 0xFFFFFFFF,
                                 c.cap_inh & 0xFFFFFFFF, c.cap_eff >> 32, c.cap_prm >> 32,
                                 c.cap_inh >> 32))
    batch.call(sysnr.CAPSET, header, data, what="capset")
    for cap in range(LAST_CAP + 1):
        if c.cap_amb >> cap & 1:
            batch.call(sysnr.PRCTL, sysnr.PR_CAP_AMBIENT, sysnr.PR_CAP_AMBIENT_RAISE, cap,
                       0, 0, what=f"raise ambient cap {cap}")
    if not c.securebits & SECBIT_KEEP_CAPS:
        batch.call(sysnr.PRCTL, sysnr.PR_SET_KEEPCAPS, 0, 0, 0, 0, what="clear keep caps")
