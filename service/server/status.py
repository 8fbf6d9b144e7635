"""Errors → what each front door answers: the gRPC status code, the HTTP status, and a
machine-readable reason. The one table of it; every front door uses it.

Reasons tell apart what one status code lumps together: ``queue_full`` and
``server_busy`` mean "retry later" (``ServiceError.retryable``), ``limit`` and
``invalid_image`` blame the request. They travel in the trailing metadata of gRPC
answers (``service.model.errors.REASON_KEY``) and in the JSON body of HTTP ones.
"""

from __future__ import annotations

from typing import Any

import grpc

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

STATUS_CODES: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    InferenceError: grpc.StatusCode.INTERNAL,
}

REASONS: dict[type[ServiceError], str] = {
    QueueFullError: "queue_full",
    ServerBusyError: "server_busy",
    LimitExceededError: "limit",
    InvalidImageError: "invalid_image",
    InvalidArgumentError: "invalid_argument",
    NotFoundError: "not_found",
    ResourceExhaustedError: "resource_exhausted",
    DeadlineExceededError: "deadline",
    UnavailableError: "unavailable",
    UnauthenticatedError: "unauthenticated",
    InferenceError: "internal",
}

# The HTTP status for each gRPC code, as grpc-gateway and KServe map them.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _first_in_mro(error: ServiceError, table: dict[type[ServiceError], Any]) -> Any:
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return None


def status_code(error: ServiceError) -> grpc.StatusCode:
    return _first_in_mro(error, STATUS_CODES) or grpc.StatusCode.INTERNAL


def reason(error: ServiceError) -> str:
    return _first_in_mro(error, REASONS) or "internal"


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def drop_references(error: BaseException) -> None:
    """Cut an exception loose from the frames (and the decoded images in them) it keeps,
    so that a failed call's memory is freed when the call ends, not at the next GC."""
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = None
