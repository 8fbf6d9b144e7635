"""The asyncio client: ``AsyncClassifierClient``, the blocking client's API with ``await``
(every call is built and read by the core)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from service.client.core import Call, ClientCore, ImageInput, R
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

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def __aenter__(self) -> AsyncClassifierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
