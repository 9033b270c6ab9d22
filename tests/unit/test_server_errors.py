from __future__ import annotations

import grpc
import pytest

from ckptd import errors
from ckptd.server.errors import status_of


@pytest.mark.parametrize("error, code", [
    (errors.UsageError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ImageError("x", offset=3), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError("x"), grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExistsError("x"), grpc.StatusCode.ALREADY_EXISTS),
    (errors.StateError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.PermissionError_("x"), grpc.StatusCode.PERMISSION_DENIED),
    (errors.TimeoutError_("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.UnsupportedError("x"), grpc.StatusCode.UNIMPLEMENTED),
    (errors.SystemError_("x"), grpc.StatusCode.INTERNAL),
    (ValueError("boom"), grpc.StatusCode.INTERNAL),
])
def test_every_error_kind_has_its_code(error, code) -> None:
    assert status_of(error)[0] is code


def test_context_is_attached_and_inner_wins() -> None:
    with pytest.raises(errors.NotFoundError) as e:
        with errors.context(container="outer", op="o1"):
            with errors.context(container="inner"):
                raise errors.NotFoundError("no such thing")
    assert e.value.context == {"container": "inner", "op": "o1"}
    assert "container=inner" in str(e.value)


def test_image_error_names_where() -> None:
    e = errors.ImageError("checksum mismatch", offset=4096, record="PAGES#3")
    assert str(e) == "bad image: checksum mismatch at record PAGES#3, byte offset 4096"
