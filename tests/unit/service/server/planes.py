"""A real data plane in this process, on a tiny real ONNX model (``gpu_decode_models``):
a repository that loads it, the online pipeline, the envelope — everything a server has
but its ports. The unit tests of the data plane and of each front door's adapter run
through it, so they start no server and train nothing."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.server.auth import TokenStore
from service.server.calls import CallEnvelope, CallLog
from service.server.config import Settings
from service.server.config_loading import load_settings
from service.server.dataplane import DataPlane
from service.server.metrics import Metrics
from service.server.online import RequestPipeline
from service.server.repository import ModelRepository
from tests.unit.service.model.gpu_decode_models import spec_for, write_tiny_model

MODEL = "tiny"


@dataclass
class Plane:
    settings: Settings
    metrics: Metrics
    repository: ModelRepository
    plane: DataPlane
    envelope: CallEnvelope
    pools: list[ThreadPoolExecutor]

    async def close(self) -> None:
        await self.repository.close()
        for pool in self.pools:
            pool.shutdown(wait=False)

    def count(self, method: str, code: str, model: str | None = None) -> float:
        """classifier_requests_total for a method and status (and model label, if given)."""
        total = 0.0
        for metric in self.metrics.registry.collect():
            for sample in metric.samples:
                labels = sample.labels
                if (
                    sample.name == "classifier_requests_total"
                    and labels.get("method") == method
                    and labels.get("code") == code
                    and model in (None, labels.get("model"))
                ):
                    total += sample.value
        return total


def publish(root: Path, version: int, name: str = MODEL) -> Path:
    spec = spec_for().model_copy(update={"name": name})
    folder = root / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    return write_tiny_model(folder / "model.onnx", spec)


async def build_plane(root: Path, token: str | None = None, **settings: Any) -> Plane:
    """A data plane on the repository at ``root`` (loaded once; no polling)."""
    if token:
        settings["auth_token"] = token
    config = load_settings(
        model_repository=root, repository_settle_seconds=0, max_queue_delay_us=0, **settings
    )
    metrics = Metrics()
    preprocess, inference = ThreadPoolExecutor(2), ThreadPoolExecutor(2)
    repository = ModelRepository(config, metrics, inference)
    await repository.load()
    pipeline = RequestPipeline(config, metrics, preprocess)
    calls = CallLog(config, metrics, repository.is_served)
    envelope = CallEnvelope(calls, TokenStore(token))
    plane = DataPlane(config, repository, pipeline, repository.serving, calls.label_for)
    return Plane(config, metrics, repository, plane, envelope, [preprocess, inference])


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (80, 60)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG", quality=95)
    return out.getvalue()


def pixels(colour: tuple[int, int, int], side: int = 64) -> np.ndarray:
    return np.full((side, side, 3), colour, dtype=np.uint8)


Scenario = Callable[[Plane], Awaitable[None]]


def run_scenario(root: Path, scenario: Scenario, **settings: object) -> None:
    """``scenario`` on a data plane over ``root``, in a fresh event loop."""

    async def main() -> None:
        plane = await build_plane(root, **settings)  # type: ignore[arg-type]
        try:
            await scenario(plane)
        finally:
            await plane.close()

    asyncio.run(main())
