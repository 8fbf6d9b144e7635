"""The asyncio client: ``AsyncClassifierClient``, the blocking client's API with ``await``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client.core import (
    DEFAULT_CHANNELS,
    DEFAULT_TARGET,
    ClientCore,
    ImageInput,
    channel_credentials,
    classifications,
    localizations,
)
from service.model.results import Classification, Localization
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.proto_gen.classifier.v1 import classifier_pb2_grpc as pb_grpc


class AsyncClassifierClient(ClientCore):
    """asyncio client. Use as an async context manager, or ``await close()``."""

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
        super().__init__(target, timeout, token, server_name, channels)
        credentials = channel_credentials(tls, root_certificates, certificate_chain, private_key)
        self.channels = [
            grpc.aio.secure_channel(target, credentials, self.options)
            if credentials
            else grpc.aio.insecure_channel(target, self.options)
            for _ in range(channels)
        ]
        self.channel = self.channels[0]
        self._stubs = [pb_grpc.ImageClassifierStub(c) for c in self.channels]
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def classify(
        self,
        images: Sequence[ImageInput],
        *,
        model: str = "",
        version: str = "",
        top_k: int = 0,
        timeout: float | None = None,
    ) -> list[Classification]:
        request = self._classify_request(images, model, version, top_k)
        response = await self.stub.Classify(
            request, timeout=timeout or self.timeout, metadata=self.metadata
        )
        return classifications(response)

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
        request = self._localize_request(images, model, version, top_k, include_heatmap)
        response = await self.stub.Localize(
            request, timeout=timeout or self.timeout, metadata=self.metadata
        )
        return localizations(response)

    async def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        response = await self.stub.ListModels(
            pb.ListModelsRequest(), timeout=timeout or self.timeout, metadata=self.metadata
        )
        return list(response.models)

    async def get_model(
        self, model: str = "", version: str = "", timeout: float | None = None
    ) -> pb.ModelInfo:
        info: pb.ModelInfo = await self.stub.GetModel(
            pb.GetModelRequest(model=model, version=version),
            timeout=timeout or self.timeout,
            metadata=self.metadata,
        )
        return info

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        response = await self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def __aenter__(self) -> AsyncClassifierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
