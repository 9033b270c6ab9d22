"""Decoding an image for people: JSON for ``ckptctl image inspect``, as CRIU's crit.

Page bytes are never included, only where they go and how many there are.
"""

from __future__ import annotations

import datetime
import mmap
from typing import Any, BinaryIO

from google.protobuf import json_format
from google.protobuf.message import Message

from ckptd.image import registry
from ckptd.image.reader import ImageReader, MessageRecord, PageRecord


def _to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def inspect_image(stream: BinaryIO, *, strict: bool = True) -> dict[str, Any]:
    """Read the whole image from ``stream`` and describe it as a JSON-ready dict.

    Raises ImageError on a bad image. With ``strict=False`` a stream digest
    mismatch is reported (``trailer.digest_ok``) instead of raised, to look
    at an image that is damaged but still framed correctly.
    """
    reader = ImageReader(stream, verify_digest=strict)
    header = reader.read_header()
    records: list[dict[str, Any]] = []
    page_records = page_bytes = 0
    for record in reader:
        entry: dict[str, Any] = {"index": record.index, "type": record.name,
                                 "offset": record.offset, "length": record.length}
        if isinstance(record, PageRecord):
            entry.update(vaddr=f"{record.vaddr:#x}", vma_id=record.vma_id,
                         data_bytes=record.data.nbytes)
            page_records += 1
            page_bytes += record.data.nbytes
        else:
            assert isinstance(record, MessageRecord)
            entry["message"] = _to_dict(record.message)
        records.append(entry)
    trailer = reader.trailer
    assert trailer is not None  # the loop ends only after the trailer checked out
    page_size = header.page_size or mmap.PAGESIZE
    return {
        "format_version": header.format_version,
        "header": _to_dict(header),
        "records": records,
        "pages": {"records": page_records, "bytes": page_bytes,
                  "page_size": page_size, "pages": page_bytes // page_size},
        "trailer": {
            "offset": reader.trailer_offset,
            "counts": {registry.type_name(c.type): c.count for c in trailer.counts},
            "payload_bytes": trailer.payload_bytes,
            "page_bytes": trailer.page_bytes,
            "digest": trailer.digest.hex(),
            "digest_ok": reader.digest_ok,
        },
        "total_bytes": reader.offset,
    }


def summarize(result: dict[str, Any]) -> str:
    """A few lines for a person, from what ``inspect_image`` returned."""
    header = result["header"]
    trailer = result["trailer"]
    pages = result["pages"]
    created = _format_time(int(header.get("created_at", 0)))
    source = header.get("source", {})
    what = (f"container {source['container_id']}" if source.get("container_id")
            else "process tree")
    if source.get("container_name"):
        what += f" ({source['container_name']})"
    if source.get("pid"):
        what += f", pid {source['pid']}"
    counts = ", ".join(f"{name} {n}" for name, n in trailer["counts"].items())
    digest = "OK" if trailer["digest_ok"] else "MISMATCH"
    return "\n".join([
        f"ckptd image, format version {result['format_version']}, "
        f"{result['total_bytes']} bytes",
        f"created  {created} by ckptd {header.get('tool_version') or '?'} on "
        f"{header.get('hostname') or '?'} ({header.get('arch') or '?'}, "
        f"kernel {header.get('kernel_release') or '?'})",
        f"source   {what}",
        f"records  {counts}",
        f"pages    {pages['pages']} pages of {pages['page_size']}, "
        f"{pages['bytes']} bytes in {pages['records']} records",
        f"digest   {digest} (sha256 {trailer['digest'][:16]}...)",
    ])


def _format_time(unix_ns: int) -> str:
    if not unix_ns:
        return "?"
    moment = datetime.datetime.fromtimestamp(unix_ns / 1e9, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="seconds")
