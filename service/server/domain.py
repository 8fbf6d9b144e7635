"""The data plane's requests and answers (``service.server.dataplane``): what the front
doors translate their wire formats to and from. Domain types: no protobuf, no HTTP."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from service.model.spec import ModelSpec
from service.server.online import ImageSource
from service.server.tensors import InputTensor, OutputRequest, TensorInfo
from service.server.versions import ModelVersion, VersionState

T = TypeVar("T")


@dataclass(frozen=True)
class ImageRequest:
    """Images for classification or localization (``top_k`` 0: the server's default)."""

    model: str
    version: str
    images: Sequence[ImageSource]
    top_k: int = 0
    deadline: float | None = None  # a time.monotonic() instant
    size_bytes: int = 0  # held against max_inflight_bytes until the answer is ready


@dataclass(frozen=True)
class TensorRequest:
    """An Open Inference Protocol call: input tensors, and the outputs wanted (none: the
    model's default outputs)."""

    model: str
    version: str
    inputs: Sequence[InputTensor]
    outputs: Sequence[OutputRequest] = ()
    deadline: float | None = None
    size_bytes: int = 0


@dataclass(frozen=True)
class Answer(Generic[T]):
    """The version that answered, and one result per image (or the output tensors)."""

    model: str
    version: str
    results: T


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


@dataclass(frozen=True)
class ModelConfiguration:
    """What Triton's model configuration says of a version (``service.server.oip_config``
    writes it as Triton's message)."""

    name: str
    platform: str
    max_batch_size: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    max_queue_delay_us: int
    preferred_batch_sizes: list[int]
    instances: int
    on_gpu: bool
    version_policy: str  # latest | all | specific
    versions: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ModelSummary:
    """A version as the model listings show it; ``spec`` is None until it has loaded."""

    name: str
    version: str
    state: VersionState
    error: str
    spec: ModelSpec | None
    max_batch_size: int
    providers: list[str]


@dataclass(frozen=True)
class Traffic:
    """The split of a model's calls that name no version: weights per version (empty:
    the newest ready version takes them all), where they come from, the ready versions."""

    model: str
    weights: dict[str, float]
    source: str
    ready: list[str]


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str  # INDEX_STATES
    reason: str


def summary(entry: ModelVersion) -> ModelSummary:
    loaded = entry.runner is not None
    return ModelSummary(
        name=entry.name,
        version=str(entry.version),
        state=entry.state,
        error=entry.error or "",
        spec=entry.spec if loaded else None,
        max_batch_size=entry.batcher.config.max_batch_size if entry.batcher else 0,
        providers=list(entry.runner.active_providers) if entry.runner else [],
    )
