"""The service's exception tree. Every failure a caller can cause or see is one of these.

    ServiceError
    ├── InvalidArgumentError          bad field, bad request shape
    │   └── InvalidImageError         undecodable, unsupported format, RawImage of wrong size
    ├── NotFoundError                 unknown model or version
    ├── ResourceExhaustedError
    │   ├── LimitExceededError        too many images, bytes or pixels (message names the limit)
    │   └── QueueFullError            the model's batch queue is full
    ├── DeadlineExceededError         the call's deadline passed before its images were computed
    ├── UnavailableError              model not ready, or the server is shutting down
    ├── UnauthenticatedError          missing or wrong credentials
    └── InferenceError                the runtime failed on a batch (the server's fault)

Domain code raises these; it never touches gRPC. ``service.servicer`` is the one place
that turns them into status codes, so the mapping lives in a single table there.
Each message says what was wrong and, for limits, what the limit is.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service reports to a caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(ServiceError):
    pass


class InvalidImageError(InvalidArgumentError):
    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message if index is None else f"image {index}: {message}")
        self.index = index


class NotFoundError(ServiceError):
    pass


class ResourceExhaustedError(ServiceError):
    pass


class LimitExceededError(ResourceExhaustedError):
    def __init__(self, what: str, value: int, limit: int, *, index: int | None = None) -> None:
        where = "" if index is None else f"image {index}: "
        super().__init__(f"{where}{what} is {value:,}, over the limit of {limit:,}")
        self.what = what
        self.value = value
        self.limit = limit
        self.index = index


class QueueFullError(ResourceExhaustedError):
    pass


class DeadlineExceededError(ServiceError):
    pass


class UnavailableError(ServiceError):
    pass


class UnauthenticatedError(ServiceError):
    pass


class InferenceError(ServiceError):
    pass
