"""The one error table: every service error's gRPC code, HTTP status and reason."""

from __future__ import annotations

import grpc
import pytest

from service.model.errors import (
    DeadlineExceededError,
    InferenceError,
    InvalidArgumentError,
    InvalidImageError,
    LimitExceededError,
    NotFoundError,
    QueueFullError,
    ResourceExhaustedError,
    ServerBusyError,
    ServiceError,
    UnauthenticatedError,
    UnavailableError,
)
from service.server.status import http_status, reason, status_code

C = grpc.StatusCode

EXPECTED = [
    # error, gRPC code, HTTP status, reason, retryable
    (InvalidArgumentError("bad field"), C.INVALID_ARGUMENT, 400, "invalid_argument", False),
    (InvalidImageError("not a JPEG", index=2), C.INVALID_ARGUMENT, 400, "invalid_image", False),
    (LimitExceededError("bytes", 9, 4), C.RESOURCE_EXHAUSTED, 429, "limit", False),
    (QueueFullError("queue full"), C.RESOURCE_EXHAUSTED, 429, "queue_full", True),
    (ServerBusyError("busy"), C.RESOURCE_EXHAUSTED, 429, "server_busy", True),
    (ResourceExhaustedError("other"), C.RESOURCE_EXHAUSTED, 429, "resource_exhausted", False),
    (NotFoundError("no model"), C.NOT_FOUND, 404, "not_found", False),
    (DeadlineExceededError("late"), C.DEADLINE_EXCEEDED, 504, "deadline", False),
    (UnavailableError("loading"), C.UNAVAILABLE, 503, "unavailable", True),
    (UnauthenticatedError("no token"), C.UNAUTHENTICATED, 401, "unauthenticated", False),
    (InferenceError("ORT failed"), C.INTERNAL, 500, "internal", False),
    (ServiceError("unclassified"), C.INTERNAL, 500, "internal", False),
]


@pytest.mark.parametrize(("error", "code", "http", "why", "retryable"), EXPECTED)
def test_each_error_maps_to_one_code_status_and_reason(
    error: ServiceError, code: grpc.StatusCode, http: int, why: str, retryable: bool
) -> None:
    assert status_code(error) is code
    assert http_status(status_code(error)) == http
    assert reason(error) == why
    assert error.retryable is retryable


def test_every_error_class_is_in_the_table() -> None:
    def subclasses(cls: type[ServiceError]) -> set[type[ServiceError]]:
        out = set(cls.__subclasses__())
        for sub in list(out):
            out |= subclasses(sub)
        return out

    covered = {type(e) for e, *_ in EXPECTED}
    assert subclasses(ServiceError) <= covered


def test_a_subclass_outside_the_table_takes_its_parents_mapping() -> None:
    class TooManyBoxes(LimitExceededError):
        pass

    error = TooManyBoxes("boxes", 5, 1, setting="max_boxes")
    assert status_code(error) is C.RESOURCE_EXHAUSTED and reason(error) == "limit"
    assert str(error) == "boxes is 5, over the limit of 1 (max_boxes)"


def test_limit_messages_name_the_image_and_the_setting() -> None:
    error = LimitExceededError("pixels", 120_000_000, 40_000_000, setting="max_pixels", index=3)
    assert str(error) == (
        "image 3: pixels is 120,000,000, over the limit of 40,000,000 (max_pixels)"
    )
    assert http_status(C.CANCELLED) == 499
    assert http_status(C.DATA_LOSS) == 500  # codes outside the table are the server's fault
