"""The asyncio client: ``AsyncClassifierClient``, the blocking client's API with ``await``
(every call is built and read by the core)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any

import grpc

from service.client.core import Call, ClientCore, ImageInput, R, traced
from service.client.streaming import InOrder, StreamAnswer, StreamItem
from service.model.results import Classification, Localization
from service.proto_gen.classifier.v1 import classifier_pb2 as pb


class AsyncClassifierClient(ClientCore):
    """asyncio client. Use as an async context manager, or ``await close()``."""

    secure_channel = staticmethod(grpc.aio.secure_channel)
    insecure_channel = staticmethod(grpc.aio.insecure_channel)

    @staticmethod
    async def _run(call: Call[R]) -> R:
        reply = await call.method(call.request, timeout=call.timeout, metadata=call.metadata)
        return call.parse(reply)

    async def classify(
        self,
        images: Sequence[ImageInput],
        *,
        model: str = "",
        version: str = "",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> list[Classification]:
        return await self._run(self.classify_call(images, model, version, top_k, timeout))

    async def localize(
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
        return await self._run(call)

    async def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return await self._run(self.list_models_call(timeout))

    async def get_model(
        self, model: str = "", version: str = "", timeout: float | None = None
    ) -> pb.ModelInfo:
        return await self._run(self.get_model_call(model, version, timeout))

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        return await self._run(self.health_call(service, timeout))

    async def stream(
        self,
        items: Iterable[StreamItem] | AsyncIterable[StreamItem],
        *,
        window: int = 32,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamAnswer]:
        """Send ``items`` on one classifier.v1 stream, up to ``window`` at a time; their
        answers, in the order sent (``service.client.streaming``). ``timeout`` bounds the
        whole stream (None: none)."""
        order = InOrder()
        room = asyncio.Semaphore(window)

        async def each() -> AsyncIterator[StreamItem]:
            if isinstance(items, AsyncIterable):
                async for item in items:
                    yield item
            else:
                for item in items:
                    yield item

        async def requests() -> AsyncIterator[Any]:
            n = 0
            async for item in each():
                await room.acquire()
                yield order.request(n, item)
                n += 1

        call = self.stub.Stream(requests(), timeout=timeout, metadata=traced(self.metadata))
        try:
            async for response in call:
                room.release()
                for answer in order.add(response):
                    yield answer
        finally:
            call.cancel()

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def __aenter__(self) -> AsyncClassifierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
