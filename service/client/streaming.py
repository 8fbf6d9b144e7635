"""Many requests on one classifier.v1 ``Stream``: what both clients send and read back.

    items = (StreamItem(images, model="demo") for images in batches)
    for answer in client.stream(items, window=32):          # in the order sent
        if isinstance(answer, StreamFailure): ...            # that request alone failed
        else: answer                                          # its Classifications

A stream costs less per request than unary calls (measured: ``python -m bench features``),
so clients that send many requests — batch scoring — use it. Up to ``window`` requests
are in flight on a stream; answers are handed back in the order the requests were sent,
whatever order the server finishes them in. A request that fails comes back as a
``StreamFailure`` (code, message, reason) without ending the stream; a broken stream
(the server gone or restarting) raises ``grpc.RpcError`` from the iteration, and the
caller decides what to send again: nothing was answered twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from service.client.core import (
    RETRYABLE_REASONS,
    ImageInput,
    classifications,
    localizations,
    to_proto_image,
)
from service.model.results import Classification, Localization
from service.proto_gen.classifier.v1 import classifier_pb2 as pb


@dataclass(frozen=True)
class StreamItem:
    """One request of a stream: a Classify (the default) or a Localize."""

    images: Sequence[ImageInput]
    model: str = ""
    version: str = ""
    top_k: int = 0
    task: Literal["classify", "localize"] = "classify"
    include_heatmap: bool = False


@dataclass(frozen=True)
class StreamFailure:
    """Why one request of a stream failed: what a unary call's error would have said."""

    code: str  # the gRPC status code's name
    message: str
    reason: str  # as error_reason(): "queue_full", "invalid_image", "limit", ...

    @property
    def retryable(self) -> bool:
        return self.reason in RETRYABLE_REASONS


StreamAnswer = list[Classification] | list[Localization] | StreamFailure


def stream_request(request_id: str, item: StreamItem) -> pb.StreamRequest:
    images = [to_proto_image(i) for i in item.images]
    if item.task == "localize":
        localize = pb.LocalizeRequest(
            model=item.model,
            version=item.version,
            top_k=item.top_k,
            include_heatmap=item.include_heatmap,
            images=images,
        )
        return pb.StreamRequest(id=request_id, localize=localize)
    classify = pb.ClassifyRequest(
        model=item.model, version=item.version, top_k=item.top_k, images=images
    )
    return pb.StreamRequest(id=request_id, classify=classify)


def stream_answer(response: pb.StreamResponse) -> StreamAnswer:
    kind = response.WhichOneof("answer")
    if kind == "classify":
        return classifications(response.classify)
    if kind == "localize":
        return localizations(response.localize)
    if kind == "error":
        e = response.error
        return StreamFailure(e.code, e.message, e.reason)
    return StreamFailure("INTERNAL", f"an answer without a result (id {response.id})", "")


class InOrder:
    """Request ids of one stream (``<stream>-<n>``: unique in the server's log), and its
    answers handed out in the order the requests were sent."""

    def __init__(self) -> None:
        self.prefix = uuid.uuid4().hex[:12]
        self.waiting: dict[int, StreamAnswer] = {}
        self.next = 0

    def request(self, n: int, item: StreamItem) -> pb.StreamRequest:
        return stream_request(f"{self.prefix}-{n}", item)

    def add(self, response: pb.StreamResponse) -> list[StreamAnswer]:
        """The answers now ready to hand out, in order."""
        self.waiting[int(response.id.rsplit("-", 1)[-1])] = stream_answer(response)
        ready = []
        while self.next in self.waiting:
            ready.append(self.waiting.pop(self.next))
            self.next += 1
        return ready
