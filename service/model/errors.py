"""The service's exception tree. Every failure a caller can cause or see is one of these.

    ServiceError
    ├── InvalidArgumentError          bad field, bad request shape
    │   └── InvalidImageError         undecodable, unsupported format, RawImage of wrong size
    ├── NotFoundError                 unknown model or version
    ├── ResourceExhaustedError
    │   ├── LimitExceededError        too many images, bytes or pixels (message names the limit)
    │   ├── QueueFullError            the model's batch queue is full (retry later)
    │   └── ServerBusyError           too many image bytes in flight server-wide (retry later)
    ├── DeadlineExceededError         the call's deadline passed before its images were computed
    ├── UnavailableError              model not ready, or the server is shutting down
    ├── UnauthenticatedError          missing or wrong credentials
    └── InferenceError                the runtime failed on a batch (the server's fault)

Domain code raises these; it never touches gRPC. ``service.server.grpc.classifier`` is the one place
that turns them into status codes, so the mapping lives in a single table there.
Each message says what was wrong and, for limits, what the limit is. ``retryable`` marks
the errors that say "not now" rather than "not this request": clients back off and retry
those, and report the others.
"""

from __future__ import annotations

# Trailing-metadata keys of every answer (wire contract): the call's request id, and for
# errors a reason that tells apart what one status code lumps together
# ("queue_full" and "server_busy" are retryable; "limit" and "invalid_image" are not).
REQUEST_ID_KEY = "x-request-id"
REASON_KEY = "classifier-error-reason"


class ServiceError(Exception):
    """Base of every error the service reports to a caller."""

    retryable = False

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
    """A configured limit; the message names it, e.g. "… over the limit of 64
    (max_images_per_request)"."""

    def __init__(
        self,
        what: str,
        value: int,
        limit: int,
        *,
        setting: str | None = None,
        index: int | None = None,
    ) -> None:
        where = "" if index is None else f"image {index}: "
        named = f" ({setting})" if setting else ""
        super().__init__(f"{where}{what} is {value:,}, over the limit of {limit:,}{named}")
        self.what = what
        self.value = value
        self.limit = limit
        self.setting = setting
        self.index = index


class QueueFullError(ResourceExhaustedError):
    retryable = True


class ServerBusyError(ResourceExhaustedError):
    retryable = True


class DeadlineExceededError(ServiceError):
    pass


class UnavailableError(ServiceError):
    retryable = True


class UnauthenticatedError(ServiceError):
    pass


class InferenceError(ServiceError):
    pass
