"""The SDK and CLI for the ImageClassifier gRPC API; imports nothing of the server.

    from service.client import ClassifierClient
    with ClassifierClient("localhost:50051") as client:
        result = client.classify(["cat.jpg"], model="demo")[0]
        print(result.top.label, result.top.score)

``AsyncClassifierClient`` is the same API for asyncio. Images may be file paths, encoded
bytes, PIL images or HxWx3 uint8 arrays (the last two travel as raw RGB, no re-encoding).
UNAVAILABLE (server starting, draining, or a model loading) is retried with exponential
backoff by gRPC's own retry policy; every call has a deadline. TLS: ``root_certificates``
(a CA file) or ``tls=True`` (the system roots); mTLS adds ``certificate_chain`` and
``private_key``. ``error_reason(exc)`` tells a full queue ("retry later") from a bad
image within RESOURCE_EXHAUSTED; ``request_id(exc)`` is the id the server logged.

``client.stream(items)`` sends many requests (``StreamItem``) on one stream, cheaper
per request than unary calls; answers come back in order, a failed request as a
``StreamFailure`` (``service.client.streaming``).

``core`` holds what both clients share (channels, credentials, requests and replies,
error helpers), ``sync`` and ``aio`` the two clients, ``cli`` the command line
(``python -m service.client``).
"""

from service.client.aio import AsyncClassifierClient
from service.client.core import (
    DEFAULT_CHANNELS,
    DEFAULT_TARGET,
    MAX_MESSAGE_BYTES,
    RETRYABLE_REASONS,
    ImageInput,
    channel_credentials,
    channel_options,
    error_reason,
    is_retryable,
    predictions_from_proto,
    read_token_file,
    request_id,
    to_proto_image,
)
from service.client.streaming import StreamAnswer, StreamFailure, StreamItem
from service.client.sync import ClassifierClient

__all__ = [
    "DEFAULT_CHANNELS",
    "DEFAULT_TARGET",
    "MAX_MESSAGE_BYTES",
    "RETRYABLE_REASONS",
    "AsyncClassifierClient",
    "ClassifierClient",
    "ImageInput",
    "StreamAnswer",
    "StreamFailure",
    "StreamItem",
    "channel_credentials",
    "channel_options",
    "error_reason",
    "is_retryable",
    "predictions_from_proto",
    "read_token_file",
    "request_id",
    "to_proto_image",
]
