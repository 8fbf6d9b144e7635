"""The shared inference pipeline: one request's images through admission, decoding and
the batcher, whatever the front door (classifier.v1, the Open Inference Protocol over
gRPC or REST). One set of limits, one budget, one queue per model version.

    rows, geometries = await pipeline.run(entry, images, deadline, call, request_bytes)

Order, and why:

1. the request's own limits (images per request);
2. admission, before anything is decoded: its bytes against ``max_inflight_bytes`` (held
   until the answer is ready, as long as the message lives), its images against the
   version's queue (``max_queue_size``) — a full server refuses at once;
3. decode and resize in the preprocess pool, within the decode budget (``DecodeBudget``);
   for a model on a GPU with GPU decoding, the request's JPEGs go together, in one pool
   task, to ``service.model.gpu_decode`` (decoded and resized on the device), and only what it
   hands back goes through the CPU path;
4. the batcher; one output row per image comes back, in order.

An image is any of: encoded bytes (decoded and resized as the model's ModelSpec says), a
``RawPixels`` (H×W×3 uint8 of any size, resized), a uint8 ndarray already at the model's
input size (used as it is), or a classifier.v1 ``Image`` message (copied out of the
message in the pool, not on the event loop). Preparing an image never raises: errors come
back as values without tracebacks, so nothing of a failed decode stays reachable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.model.decode_budget import DecodeBudget
from service.model.errors import (
    InvalidArgumentError,
    InvalidImageError,
    LimitExceededError,
    ResourceExhaustedError,
    ServerBusyError,
    ServiceError,
)
from service.model.geometry import Geometry
from service.model.gpu_decode import DevicePreprocessor
from service.model.image_header import ImageLimits
from service.model.memory import FreedMemory
from service.model.preprocess import preprocess_encoded, preprocess_raw
from service.model.spec import ModelSpec
from service.server.calls import CallInfo
from service.server.config import Settings
from service.server.metrics import Metrics
from service.server.statistics import Stages
from service.server.status import drop_references
from service.server.versions import ModelVersion

log = logging.getLogger(__name__)

Row = dict[str, np.ndarray]


@dataclass(frozen=True)
class RawPixels:
    """H×W×3 uint8 pixels, row-major, of any size (resized like a decoded image)."""

    height: int
    width: int
    rgb: bytes


ImageSource = Any  # bytes | memoryview | RawPixels | np.ndarray | classifier.v1 Image
Prepared = tuple[np.ndarray, Geometry, float]


def identity_geometry(height: int, width: int) -> Geometry:
    """An image already at the model's input size maps onto it one to one."""
    return Geometry(width, height, width, height, 1.0, 1.0, 0.0, 0.0)


def _prepare_one(
    image: ImageSource,
    spec: ModelSpec,
    limits: ImageLimits,
    index: int,
    budget: DecodeBudget,
    deadline: float | None,
) -> tuple[np.ndarray, Geometry]:
    if hasattr(image, "WhichOneof"):  # a classifier.v1 Image message
        kind = image.WhichOneof("data")
        if kind == "encoded":
            image = image.encoded
        elif kind == "raw":
            image = RawPixels(image.raw.height, image.raw.width, image.raw.rgb)
        else:
            raise InvalidImageError("has neither encoded bytes nor raw pixels", index=index)
    if isinstance(image, bytes | bytearray | memoryview):
        return preprocess_encoded(
            bytes(image), spec, limits, index=index, budget=budget, deadline=deadline
        )
    if isinstance(image, RawPixels):
        return preprocess_raw(
            image.height,
            image.width,
            image.rgb,
            spec,
            limits,
            index=index,
            budget=budget,
            deadline=deadline,
        )
    if isinstance(image, np.ndarray):
        h, w = spec.input.height, spec.input.width
        if image.dtype != np.uint8 or image.shape != (h, w, 3):
            raise InvalidImageError(
                f"a tensor image must be uint8 [{h}, {w}, 3] (the model's input size), "
                f"got {image.dtype} {list(image.shape)}",
                index=index,
            )
        return np.ascontiguousarray(image), identity_geometry(h, w)
    raise InvalidImageError(f"unsupported image type {type(image).__name__}", index=index)


def prepare(
    image: ImageSource,
    spec: ModelSpec,
    limits: ImageLimits,
    index: int,
    budget: DecodeBudget,
    deadline: float | None,
) -> Prepared | ServiceError:
    """One image → model input, or the error to report. Never raises: a returned error
    carries no traceback, so nothing of the failed decode stays reachable."""
    started = time.perf_counter()
    failure: ServiceError | None = None
    try:
        array, geometry = _prepare_one(image, spec, limits, index, budget, deadline)
        return array, geometry, time.perf_counter() - started
    except ServiceError as exc:
        drop_references(exc)
        failure = exc
    except MemoryError:
        failure = ResourceExhaustedError(f"image {index}: not enough memory; retry later")
    except Exception as exc:  # a decoder bug must not become INTERNAL for the caller
        log.warning("image %d: unexpected %s while preprocessing", index, type(exc).__name__)
        failure = InvalidImageError(f"cannot process image: {exc}", index=index)
    return failure


def _encoded(image: ImageSource) -> bool:
    """Encoded bytes, as such or in a classifier.v1 Image (looked at, not copied)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return True
    return hasattr(image, "WhichOneof") and image.WhichOneof("data") == "encoded"


def _encoded_bytes(image: ImageSource) -> bytes:
    return bytes(image.encoded if hasattr(image, "WhichOneof") else image)


def prepare_on_device(
    device: DevicePreprocessor,
    images: Sequence[ImageSource],
    positions: Sequence[int],
    limits: ImageLimits,
    budget: DecodeBudget,
    deadline: float | None,
) -> list[Prepared | ServiceError | None]:
    """The encoded images at ``positions`` through GPU decoding, in one pool task; None
    where the CPU path must take an image. Never raises, as ``prepare``."""
    started = time.perf_counter()
    try:
        datas = [_encoded_bytes(images[i]) for i in positions]
        outcomes = device.prepare(datas, limits, budget, deadline, indices=positions)
    except Exception as exc:  # the GPU path's own failure: the CPU path takes them all
        log.warning("GPU decoding failed for a request (%s); decoding on the CPU", exc)
        return [None] * len(positions)
    per_image = (time.perf_counter() - started) / max(1, len(positions))
    out: list[Prepared | ServiceError | None] = []
    for outcome in outcomes:
        if isinstance(outcome, tuple):
            out.append((outcome[0], outcome[1], per_image))  # type: ignore[arg-type]
        else:
            out.append(outcome)
    return out


class InflightBytes:
    """Image bytes of the calls being served at once, bounded server-wide. What a call
    held is reported to ``freed`` when it ends (its message is freed right after)."""

    def __init__(self, limit: int, freed: FreedMemory | None = None):
        self.limit = limit
        self.used = 0
        self.freed = freed

    def hold(self, count: int) -> _Hold:
        if self.used + count > self.limit and self.used > 0:
            raise ServerBusyError(
                f"the server is busy: {self.used:,} bytes of images in flight, this request "
                f"adds {count:,}, the limit is {self.limit:,} (max_inflight_bytes); retry later"
            )
        self.used += count
        return _Hold(self, count)


class _Hold:
    def __init__(self, owner: InflightBytes, count: int):
        self.owner, self.count = owner, count

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.owner.used -= self.count
        if self.owner.freed is not None:
            self.owner.freed.freed(self.count)


class RequestPipeline:
    def __init__(self, settings: Settings, metrics: Metrics, preprocess_pool: Executor):
        self.settings = settings
        self.metrics = metrics
        self.pool = preprocess_pool
        self.limits = settings.image_limits()
        self.freed = FreedMemory()
        self.budget = DecodeBudget(settings.max_decode_pixels, self.freed)
        self.inflight = InflightBytes(settings.max_inflight_bytes, self.freed)

    def check_count(self, count: int) -> None:
        if count == 0:
            raise InvalidArgumentError("the request has no images")
        limit = self.settings.max_images_per_request
        if count > limit:
            raise LimitExceededError(
                "images per request", count, limit, setting="max_images_per_request"
            )

    async def run(
        self,
        entry: ModelVersion,
        images: Sequence[ImageSource],
        deadline: float | None,
        call: CallInfo,
        request_bytes: int,
    ) -> tuple[list[Row], list[Geometry]]:
        """One output row and one geometry per image, in order (``deadline``: a
        ``time.monotonic()`` instant, or None)."""
        started = time.monotonic()
        count = len(images)
        call.images = count
        self.check_count(count)
        assert entry.batcher is not None
        spec = entry.spec
        with self.inflight.hold(request_bytes):
            with entry.batcher.admit(count) as admission:
                admitted = time.monotonic()
                loop = asyncio.get_running_loop()

                def decode(i: int, image: ImageSource) -> asyncio.Future[Prepared | ServiceError]:
                    return loop.run_in_executor(
                        self.pool, prepare, image, spec, self.limits, i, self.budget, deadline
                    )

                device = entry.runner.device_preprocessor if entry.runner else None
                if device is not None:
                    prepared = await self._prepare_with_device(device, images, deadline, decode)
                elif count == 1:  # most calls: no gather around a single future
                    prepared = [await decode(0, images[0])]
                else:
                    prepared = await asyncio.gather(*map(decode, range(count), images))
                arrays, geometries = [], []
                for item in prepared:
                    if isinstance(item, ServiceError):
                        raise item
                    arrays.append(item[0])
                    geometries.append(item[1])
                    self.metrics.preprocess_duration.observe(item[2])
                del prepared
                futures = admission.submit(arrays, deadline)
                submitted = time.monotonic()
            rows: list[Row | BaseException]
            try:
                if count == 1:  # an error is raised here rather than returned
                    rows = [await futures[0]]
                else:
                    rows = await asyncio.gather(*futures, return_exceptions=True)
            except asyncio.CancelledError:
                for future in futures:
                    future.cancel()  # the batcher drops them before compute
                raise
        for row in rows:
            if isinstance(row, BaseException):
                raise row
        if call.stages is not None:
            timed(call.stages, started, admitted, submitted, rows)  # type: ignore[arg-type]
        self.metrics.child(self.metrics.images, call.model, call.version).inc(count)
        return rows, geometries  # type: ignore[return-value]

    async def _prepare_with_device(
        self,
        device: DevicePreprocessor,
        images: Sequence[ImageSource],
        deadline: float | None,
        decode: Callable[[int, ImageSource], asyncio.Future[Prepared | ServiceError]],
    ) -> list[Prepared | ServiceError]:
        """The request's encoded images through GPU decoding together; the rest, and what
        it hands back, through ``prepare`` one by one. In request order."""
        positions = [i for i, image in enumerate(images) if _encoded(image)]
        prepared: list[Prepared | ServiceError | None] = [None] * len(images)
        if positions:
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self.pool,
                prepare_on_device,
                device,
                images,
                positions,
                self.limits,
                self.budget,
                deadline,
            )
            for position, outcome in zip(positions, outcomes, strict=True):
                prepared[position] = outcome
        rest = [i for i, item in enumerate(prepared) if item is None]
        if rest:
            done = await asyncio.gather(*(decode(i, images[i]) for i in rest))
            for i, item in zip(rest, done, strict=True):
                prepared[i] = item
        return prepared  # type: ignore[return-value]


def timed(
    stages: Stages, started: float, admitted: float, submitted: float, rows: Sequence[Row]
) -> None:
    """When the request was taken, admitted, submitted to the batcher, when the last of
    its batches was dispatched (``BatchRow``), and now: every row back."""
    dispatched = max((getattr(row, "dispatched", submitted) for row in rows), default=submitted)
    stages.started, stages.admitted, stages.submitted = started, admitted, submitted
    stages.dispatched = max(dispatched, submitted)
    stages.rows_back = time.monotonic()
    stages.batches = [getattr(row, "batch", None) for row in rows]


def deadline_of(time_remaining: float | None) -> float | None:
    """A call's remaining time → a ``time.monotonic()`` deadline."""
    return None if time_remaining is None else time.monotonic() + time_remaining
