"""Which protobuf message each metadata record type carries.

The table below is where a new record kind is added (next to its enum value
and message in ``proto/ckptd/v1/image.proto``), so that every reader — restore
and ``ckptctl image inspect`` alike — can decode it without importing the
engine. ``register()`` lets a module outside the image layer (a test, an
experiment) add a kind at run time.
"""

from __future__ import annotations

from google.protobuf.message import Message

from ckptd.errors import BugError
from ckptd.v1 import image_pb2

RecordType = image_pb2.RecordType

HEADER = image_pb2.RECORD_TYPE_HEADER
TRAILER = image_pb2.RECORD_TYPE_TRAILER
PAGES = image_pb2.RECORD_TYPE_PAGES

# Record types whose payload is not a protobuf message (framed in format.py).
RAW_TYPES: frozenset[int] = frozenset({PAGES})

_MESSAGES: dict[int, type[Message]] = {
    HEADER: image_pb2.ImageHeader,
    TRAILER: image_pb2.Trailer,
    image_pb2.RECORD_TYPE_ORIGIN: image_pb2.Origin,
    image_pb2.RECORD_TYPE_TASK: image_pb2.Task,
    image_pb2.RECORD_TYPE_MM: image_pb2.Mm,
    image_pb2.RECORD_TYPE_FILES: image_pb2.Files,
    image_pb2.RECORD_TYPE_FILE_DATA: image_pb2.FileData,
}

_PREFIX = "RECORD_TYPE_"
# The wire field is u32, but the trailer counts types as a protobuf enum (int32).
_ENUM_MAX = 2**31 - 1


def register(record_type: int, message_class: type[Message]) -> None:
    """Map a metadata record type to its message class.

    Registering the same pair twice is a no-op (modules may be re-imported);
    re-mapping a type to another class is a bug, since images already written
    with the old meaning would be misread.
    """
    if record_type in RAW_TYPES or not 0 < record_type <= _ENUM_MAX:
        raise BugError(f"record type {type_name(record_type)} cannot carry a message")
    known = _MESSAGES.get(record_type)
    if known is not None and known is not message_class:
        raise BugError(f"record type {type_name(record_type)} is already "
                       f"{known.DESCRIPTOR.full_name}")
    _MESSAGES[record_type] = message_class


def message_class(record_type: int) -> type[Message] | None:
    """The message class of a metadata record type; None for raw or unknown types."""
    return _MESSAGES.get(record_type)


def is_known(record_type: int) -> bool:
    return record_type in _MESSAGES or record_type in RAW_TYPES


def type_name(record_type: int) -> str:
    """Short name for messages and JSON: ``PAGES``, or ``type 77`` if unknown."""
    try:
        name = RecordType.Name(record_type)
    except ValueError:
        return f"type {record_type}"
    return name.removeprefix(_PREFIX)
