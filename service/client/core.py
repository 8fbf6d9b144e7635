"""What the blocking and the asyncio clients share: channel options and credentials, the
pool of channels and its round-robin, request building and reply parsing (protobuf ↔ the
result types), and the helpers that read a failed call's reason and request id."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import propagate
from PIL import Image

from service.model.errors import REASON_KEY, REQUEST_ID_KEY
from service.model.results import Box, Classification, Heatmap, Localization, Prediction
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.proto_gen.classifier.v1 import classifier_pb2_grpc as pb_grpc

ImageInput = str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray | pb.Image

DEFAULT_TARGET = os.environ.get("CLASSIFIER_TARGET", "localhost:50051")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_SERVICE_CONFIG = {
    # Several addresses behind one name (a headless Kubernetes Service): spread calls.
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [
                {"service": "classifier.v1.ImageClassifier"},
                {"service": "grpc.health.v1.Health"},
            ],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2.0,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(_SERVICE_CONFIG)),
        # Requests are retried only while they fit this buffer (default 256 KiB).
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
    ]


def to_proto_image(image: ImageInput) -> pb.Image:
    if isinstance(image, pb.Image):  # already built (the scoring engine reads files first)
        return image
    if isinstance(image, str | Path):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, bytes | bytearray | memoryview):
        return pb.Image(encoded=bytes(image))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"arrays must be HxWx3 uint8, got {array.dtype} {array.shape}")
        h, w = array.shape[:2]
        return pb.Image(
            raw=pb.RawImage(height=h, width=w, rgb=np.ascontiguousarray(array).tobytes())
        )
    raise TypeError(f"unsupported image type {type(image).__name__}")


def predictions_from_proto(items: Sequence[pb.Prediction]) -> list[Prediction]:
    return [Prediction(p.index, p.label, p.score) for p in items]


def classifications(response: pb.ClassifyResponse) -> list[Classification]:
    return [
        Classification(predictions_from_proto(r.predictions), response.model, response.version)
        for r in response.results
    ]


def localizations(response: pb.LocalizeResponse) -> list[Localization]:
    out = []
    for r in response.results:
        heatmap = None
        if r.HasField("heatmap") and r.heatmap.height:
            values = np.asarray(r.heatmap.values, dtype=np.float32)
            heatmap = Heatmap(
                r.heatmap.height, r.heatmap.width, values.reshape(r.heatmap.height, r.heatmap.width)
            )
        b = r.box
        out.append(
            Localization(
                predictions_from_proto(r.predictions),
                Box(b.x_min, b.y_min, b.x_max, b.y_max, b.score),
                r.box_source,
                heatmap,
                response.model,
                response.version,
            )
        )
    return out


# Reasons that mean "not now": back off and send the same request again.
RETRYABLE_REASONS = frozenset({"queue_full", "server_busy"})


def _trailer(exc: grpc.RpcError, key: str) -> str | None:
    trailing = getattr(exc, "trailing_metadata", None)
    for k, v in (trailing() if callable(trailing) else None) or ():
        if k == key:
            return str(v)
    return None


def error_reason(exc: grpc.RpcError) -> str | None:
    """The server's reason for an error: "queue_full", "server_busy", "limit",
    "invalid_image", "not_found", ... (None from servers that do not send one)."""
    return _trailer(exc, REASON_KEY)


def request_id(exc: grpc.RpcError) -> str | None:
    """The request id the server gave the failed call (in its access log and message)."""
    return _trailer(exc, REQUEST_ID_KEY)


def is_retryable(exc: grpc.RpcError) -> bool:
    """True for "retry later" answers (a full queue, a busy server), not for bad requests."""
    return error_reason(exc) in RETRYABLE_REASONS


def channel_credentials(
    tls: bool = False,
    root_certificates: Path | None = None,
    certificate_chain: Path | None = None,
    private_key: Path | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files (None: plaintext). A client certificate and key
    (mTLS) go together."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("a client certificate and its key go together (mTLS)")
    if not tls and root_certificates is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates.read_bytes() if root_certificates else None,
        certificate_chain=certificate_chain.read_bytes() if certificate_chain else None,
        private_key=private_key.read_bytes() if private_key else None,
    )


def read_token_file(path: Path) -> str:
    """The first token in a token file (the server's format: one per line, # comments)."""
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            return line.strip()
    raise ValueError(f"no token in {path}")


DEFAULT_CHANNELS = 4


R = TypeVar("R")


def traced(metadata: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``metadata`` and the caller's OpenTelemetry context (W3C ``traceparent``), when the
    caller has one: the server's spans of the call then join the caller's trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [*metadata, *carrier.items()] if carrier else metadata


@dataclass(frozen=True)
class Call(Generic[R]):
    """One RPC as both clients make it: the stub method, its request, how to read the
    reply, and the deadline; the clients only differ in how they wait for it."""

    method: Any  # a stub's bound method
    request: Any
    parse: Callable[[Any], R]
    timeout: float
    metadata: Sequence[tuple[str, str]] = ()


class ClientCore:
    """What both clients share: credentials, metadata, a pool of channels, and every call
    (request built, reply read); ``sync`` and ``aio`` only run them.

    A server with worker processes (``--workers``) shares its port between them, and the
    kernel balances connections, not calls: a client with one connection reaches one
    worker. So calls go round-robin over ``channels`` channels, each with a connection of
    its own (a local subchannel pool; channels with equal arguments would otherwise share
    one connection).
    """

    # grpc's channel constructors, or grpc.aio's (set by each client)
    secure_channel: Callable[..., Any]
    insecure_channel: Callable[..., Any]

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 30.0,
        token: str | None = None,
        tls: bool = False,
        root_certificates: Path | None = None,
        certificate_chain: Path | None = None,
        private_key: Path | None = None,
        server_name: str | None = None,
        channels: int = DEFAULT_CHANNELS,
    ):
        if channels < 1:
            raise ValueError("channels must be >= 1")
        self.target = target
        self.timeout = timeout
        self.metadata: list[tuple[str, str]] = []
        if token:
            self.metadata.append(("authorization", f"Bearer {token}"))
        self.options = channel_options()
        if server_name:  # a certificate issued for another name than the target's host
            self.options.append(("grpc.ssl_target_name_override", server_name))
        if channels > 1:
            self.options.append(("grpc.use_local_subchannel_pool", 1))
        self.channel_count = channels
        credentials = channel_credentials(tls, root_certificates, certificate_chain, private_key)
        self.channels = [
            type(self).secure_channel(target, credentials, self.options)
            if credentials
            else type(self).insecure_channel(target, self.options)
            for _ in range(channels)
        ]
        self.channel = self.channels[0]
        self._stubs = [pb_grpc.ImageClassifierStub(c) for c in self.channels]
        self._next = itertools.cycle(range(channels))
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    @property
    def stub(self) -> Any:
        """The classifier stub of the next channel (round-robin)."""
        return self._stubs[next(self._next)]

    def _call(
        self, method: Any, request: Any, parse: Callable[[Any], R], timeout: float | None
    ) -> Call[R]:
        return Call(method, request, parse, timeout or self.timeout, traced(self.metadata))

    def classify_call(
        self,
        images: Sequence[ImageInput],
        model: str,
        version: str,
        top_k: int,
        timeout: float | None,
    ) -> Call[list[Classification]]:
        request = pb.ClassifyRequest(
            model=model, version=version, top_k=top_k, images=[to_proto_image(i) for i in images]
        )
        return self._call(self.stub.Classify, request, classifications, timeout)

    def localize_call(
        self,
        images: Sequence[ImageInput],
        model: str,
        version: str,
        top_k: int,
        include_heatmap: bool,
        timeout: float | None,
    ) -> Call[list[Localization]]:
        request = pb.LocalizeRequest(
            model=model,
            version=version,
            top_k=top_k,
            include_heatmap=include_heatmap,
            images=[to_proto_image(i) for i in images],
        )
        return self._call(self.stub.Localize, request, localizations, timeout)

    def list_models_call(self, timeout: float | None) -> Call[list[pb.ModelInfo]]:
        return self._call(
            self.stub.ListModels, pb.ListModelsRequest(), lambda r: list(r.models), timeout
        )

    def get_model_call(self, model: str, version: str, timeout: float | None) -> Call[pb.ModelInfo]:
        request = pb.GetModelRequest(model=model, version=version)
        return self._call(self.stub.GetModel, request, lambda r: r, timeout)

    def health_call(self, service: str, timeout: float | None) -> Call[str]:
        """'SERVING', 'NOT_SERVING', ... for the server ("") or one service name."""
        return Call(  # no token: health is open, as probes call it
            self.health_stub.Check,
            health_pb2.HealthCheckRequest(service=service),
            lambda r: str(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)),
            timeout or self.timeout,
        )
