"""The gRPC service: protobuf ⇄ domain types, and the one place errors become status codes.

A request flows: authorize → resolve the model version → decode and resize every image in
the preprocess thread pool → submit them to the version's batcher → await one output row
per image → postprocess (top-k, boxes, CAM boxes, heatmaps) → response. Any ServiceError
raised on the way becomes its status code through ``STATUS_CODES`` with its own message;
anything else is INTERNAL with a request id to find it in the logs. Every request
succeeds or fails on its own.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import grpc
import numpy as np

from service.config import Settings
from service.errors import (
    DeadlineExceededError,
    InferenceError,
    InvalidArgumentError,
    InvalidImageError,
    LimitExceededError,
    NotFoundError,
    ResourceExhaustedError,
    ServiceError,
    UnauthenticatedError,
    UnavailableError,
)
from service.metrics import Metrics
from service.model_spec import ModelSpec
from service.postprocess import heatmap, locate, top_k
from service.preprocess import Geometry, ImageLimits, preprocess_encoded, preprocess_raw
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.proto_gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from service.repository import ModelRepository, ModelVersion
from service.results import Box, Prediction

log = logging.getLogger(__name__)

# The single mapping from the exception tree (service.errors) to gRPC status codes.
STATUS_CODES: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    InferenceError: grpc.StatusCode.INTERNAL,
}


def status_code(error: ServiceError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


Prepared = tuple[np.ndarray, Geometry, float]


def _prepare(image: pb.Image, spec: ModelSpec, limits: ImageLimits, index: int) -> Prepared:
    started = time.perf_counter()
    kind = image.WhichOneof("data")
    if kind == "encoded":
        array, geometry = preprocess_encoded(image.encoded, spec, limits, index=index)
    elif kind == "raw":
        raw = image.raw
        array, geometry = preprocess_raw(raw.height, raw.width, raw.rgb, spec, limits, index=index)
    else:
        raise InvalidImageError("has neither encoded bytes nor raw pixels", index=index)
    return array, geometry, time.perf_counter() - started


def _predictions(items: Sequence[Prediction]) -> list[pb.Prediction]:
    return [pb.Prediction(index=p.index, label=p.label, score=p.score) for p in items]


def _box(box: Box) -> pb.Box:
    return pb.Box(
        x_min=box.x_min, y_min=box.y_min, x_max=box.x_max, y_max=box.y_max, score=box.score
    )


class ImageClassifierServicer(pb_grpc.ImageClassifierServicer):
    def __init__(
        self,
        settings: Settings,
        repository: ModelRepository,
        metrics: Metrics,
        preprocess_pool: Executor,
        shutting_down: Callable[[], bool],
    ):
        self.settings = settings
        self.repository = repository
        self.metrics = metrics
        self.pool = preprocess_pool
        self.limits = settings.image_limits()
        self.shutting_down = shutting_down
        token = settings.auth_token
        self._expected_auth = f"Bearer {token.get_secret_value()}".encode() if token else None
        self._id_prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count(1)

    # --- RPCs ---------------------------------------------------------------------------

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyResponse:
        return await self._call("Classify", request, context, self._classify)  # type: ignore[no-any-return]

    async def Localize(self, request: pb.LocalizeRequest, context: Any) -> pb.LocalizeResponse:
        return await self._call("Localize", request, context, self._localize)  # type: ignore[no-any-return]

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        async def run(entry_request: Any, ctx: Any, labels: dict[str, str]) -> Any:
            versions = sorted(self.repository.all_versions(), key=lambda v: (v.name, v.version))
            return pb.ListModelsResponse(models=[self._model_info(v) for v in versions])

        return await self._call("ListModels", request, context, run)  # type: ignore[no-any-return]

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.ModelInfo:
        async def run(req: pb.GetModelRequest, ctx: Any, labels: dict[str, str]) -> Any:
            entry = self.repository.resolve(req.model, req.version)
            labels.update(model=entry.name, version=str(entry.version))
            return self._model_info(entry)

        return await self._call("GetModel", request, context, run)  # type: ignore[no-any-return]

    # --- the common envelope: auth, errors, metrics, logging ------------------------------

    async def _call(self, method: str, request: Any, context: Any, handler: Any) -> Any:
        started = time.perf_counter()
        request_id = self._request_id(context)
        labels = {"model": getattr(request, "model", ""), "version": ""}
        error: ServiceError | None = None
        code = grpc.StatusCode.OK
        try:
            self._authorize(context)
            return await handler(request, context, labels)
        except ServiceError as exc:
            error, code = exc, status_code(exc)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("request %s %s failed unexpectedly", request_id, method)
            error = InferenceError(f"internal error (request id {request_id})")
            code = grpc.StatusCode.INTERNAL
        finally:
            seconds = time.perf_counter() - started
            self.metrics.child(
                self.metrics.requests, labels["model"], labels["version"], method, code.name
            ).inc()
            self.metrics.child(self.metrics.request_duration, labels["model"], method).observe(
                seconds
            )
            level = logging.DEBUG if code is grpc.StatusCode.OK else logging.WARNING
            if log.isEnabledFor(level):  # the extra dict costs more than the call itself
                log.log(
                    level,
                    "%s %s",
                    method,
                    code.name,
                    extra={
                        "request_id": request_id,
                        "method": method,
                        "code": code.name,
                        "model": labels["model"],
                        "version": labels["version"],
                        "ms": round(seconds * 1000, 2),
                        "error": error.message if error else None,
                    },
                )
        assert error is not None
        await context.abort(code, error.message)

    def _request_id(self, context: Any) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id" and value:
                return str(value)[:64]
        # Unique per process and cheap (uuid4 reads the OS entropy pool on every call).
        return f"{self._id_prefix}-{next(self._ids):x}"

    def _authorize(self, context: Any) -> None:
        if self._expected_auth is None:
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                if hmac.compare_digest(got, self._expected_auth):
                    return
                break
        raise UnauthenticatedError(
            "missing or wrong token: send metadata 'authorization: Bearer <token>'"
        )

    # --- Classify / Localize ------------------------------------------------------------

    def _resolve(self, request: Any, labels: dict[str, str]) -> ModelVersion:
        if self.shutting_down():
            raise UnavailableError("the server is shutting down; retry on another replica")
        entry = self.repository.resolve(request.model, request.version)
        labels.update(model=entry.name, version=str(entry.version))
        return entry

    async def _infer(
        self, entry: ModelVersion, request: Any, context: Any, labels: dict[str, str]
    ) -> tuple[list[dict[str, np.ndarray]], list[Geometry]]:
        count = len(request.images)
        if count == 0:
            raise InvalidArgumentError("the request has no images")
        if count > self.settings.max_images_per_request:
            raise LimitExceededError(
                "images per request", count, self.settings.max_images_per_request
            )
        loop = asyncio.get_running_loop()
        prepared = await asyncio.gather(
            *(
                loop.run_in_executor(self.pool, _prepare, image, entry.spec, self.limits, i)
                for i, image in enumerate(request.images)
            ),
            return_exceptions=True,
        )
        _raise_first(prepared)
        for _, _, seconds in prepared:  # type: ignore[misc]
            self.metrics.preprocess_duration.observe(seconds)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        assert entry.batcher is not None
        futures = entry.batcher.submit([p[0] for p in prepared], deadline)  # type: ignore[index]
        try:
            rows = await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()  # the batcher drops them before compute
            raise
        _raise_first(rows)
        self.metrics.child(self.metrics.images, labels["model"], labels["version"]).inc(count)
        return rows, [p[1] for p in prepared]  # type: ignore[index,return-value]

    def _top_k(self, request: Any, spec: ModelSpec) -> int:
        return min(request.top_k or self.settings.default_top_k, spec.num_classes)

    async def _classify(
        self, request: pb.ClassifyRequest, context: Any, labels: dict[str, str]
    ) -> pb.ClassifyResponse:
        entry = self._resolve(request, labels)
        rows, _ = await self._infer(entry, request, context, labels)
        spec, k = entry.spec, self._top_k(request, entry.spec)
        results = [
            pb.Classification(
                predictions=_predictions(top_k(row[spec.outputs.probabilities], k, spec.labels))
            )
            for row in rows
        ]
        return pb.ClassifyResponse(model=entry.name, version=str(entry.version), results=results)

    async def _localize(
        self, request: pb.LocalizeRequest, context: Any, labels: dict[str, str]
    ) -> pb.LocalizeResponse:
        entry = self._resolve(request, labels)
        spec = entry.spec
        if not spec.has_boxes and not spec.has_cam:
            raise InvalidArgumentError(
                f"model {entry.name!r} cannot localize: it has neither "
                "a box head nor class activation maps"
            )
        if request.include_heatmap and not spec.has_cam:
            raise InvalidArgumentError(
                f"model {entry.name!r} exports no class activation "
                "maps, so include_heatmap is not available"
            )
        rows, geometries = await self._infer(entry, request, context, labels)
        k = self._top_k(request, spec)
        results = await asyncio.get_running_loop().run_in_executor(
            self.pool, self._localizations, spec, rows, geometries, k, request.include_heatmap
        )
        return pb.LocalizeResponse(model=entry.name, version=str(entry.version), results=results)

    def _localizations(
        self,
        spec: ModelSpec,
        rows: list[dict[str, np.ndarray]],
        geometries: list[Geometry],
        k: int,
        include_heatmap: bool,
    ) -> list[pb.Localization]:
        h, w = spec.input.height, spec.input.width
        out = []
        for row, geometry in zip(rows, geometries, strict=True):
            predictions = top_k(row[spec.outputs.probabilities], k, spec.labels)
            box, source = locate(row, geometry, spec, predictions[0].score)
            item = pb.Localization(
                predictions=_predictions(predictions), box=_box(box), box_source=source
            )
            if include_heatmap:
                hm = heatmap(
                    row[str(spec.outputs.cam)][0], geometry, h, w, self.settings.heatmap_max_side
                )
                item.heatmap.height, item.heatmap.width = hm.height, hm.width
                item.heatmap.values.extend(hm.values.ravel().tolist())
            out.append(item)
        return out

    # --- model info ---------------------------------------------------------------------

    def _model_info(self, entry: ModelVersion) -> pb.ModelInfo:
        info = pb.ModelInfo(
            name=entry.name,
            version=str(entry.version),
            state=entry.state.value,
            error=entry.error or "",
        )
        if entry.runner is None:
            return info
        spec = entry.spec
        info.task = spec.task.value
        info.labels.extend(spec.labels)
        info.input_height, info.input_width = spec.input.height, spec.input.width
        info.resize_mode = spec.preprocessing.resize_mode.value
        info.has_boxes, info.has_cam = spec.has_boxes, spec.has_cam
        info.backbone, info.precision = spec.backbone, spec.precision.value
        info.metrics.update(spec.metrics)
        info.max_batch_size = entry.batcher.config.max_batch_size if entry.batcher else 0
        info.providers.extend(entry.runner.active_providers)
        info.model_spec_json = spec.to_json()
        return info


def _raise_first(results: Sequence[Any]) -> None:
    for value in results:
        if isinstance(value, BaseException):
            raise value
