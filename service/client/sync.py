"""The blocking client: ``ClassifierClient`` (every call is built and read by the core)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

from service.client.core import Call, ClientCore, ImageInput, R, traced
from service.client.streaming import InOrder, StreamAnswer, StreamItem
from service.model.results import Classification, Localization
from service.proto_gen.classifier.v1 import classifier_pb2 as pb


class ClassifierClient(ClientCore):
    """Blocking client. Use as a context manager, or call ``close()``."""

    secure_channel = staticmethod(grpc.secure_channel)
    insecure_channel = staticmethod(grpc.insecure_channel)

    @staticmethod
    def _run(call: Call[R]) -> R:
        return call.parse(call.method(call.request, timeout=call.timeout, metadata=call.metadata))

    def classify(
        self,
        images: Sequence[ImageInput],
        *,
        model: str = "",
        version: str = "",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> list[Classification]:
        return self._run(self.classify_call(images, model, version, top_k, timeout))

    def localize(
        self,
        images: Sequence[ImageInput],
        *,
        model: str = "",
        version: str = "",
        top_k: int = 0,
        include_heatmap: bool = False,
        timeout: float | None = None,
    ) -> list[Localization]:
        call = self.localize_call(images, model, version, top_k, include_heatmap, timeout)
        return self._run(call)

    def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return self._run(self.list_models_call(timeout))

    def get_model(
        self, model: str = "", version: str = "", timeout: float | None = None
    ) -> pb.ModelInfo:
        return self._run(self.get_model_call(model, version, timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """'SERVING', 'NOT_SERVING', ... for the server ("") or one service name."""
        return self._run(self.health_call(service, timeout))

    def stream(
        self, items: Iterable[StreamItem], *, window: int = 32, timeout: float | None = None
    ) -> Iterator[StreamAnswer]:
        """Send ``items`` on one classifier.v1 stream, up to ``window`` at a time; their
        answers, in the order sent (``service.client.streaming``). ``timeout`` bounds the
        whole stream (None: none)."""
        order = InOrder()
        room = threading.Semaphore(window)
        closing = threading.Event()

        def requests() -> Iterator[Any]:  # read by gRPC's own thread
            for n, item in enumerate(items):
                room.acquire()
                if closing.is_set():
                    return
                yield order.request(n, item)

        responses = self.stub.Stream(requests(), timeout=timeout, metadata=traced(self.metadata))
        try:
            for response in responses:
                room.release()
                yield from order.add(response)
        finally:
            closing.set()
            room.release()  # a sender waiting for room sees the stream closing
            responses.cancel()

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
