"""The gRPC service: protobuf ⇄ domain types, and the one place errors become status codes.

A request flows: resolve the model version and lease it (so a swap cannot unload it
under the call) → admit its image bytes (``max_inflight_bytes``) and its images into the
version's queue (``max_queue_size``), both before anything is decoded → decode and resize
every image in the preprocess thread pool, within the decode budget → submit them to the
batcher → await one output row per image → postprocess (top-k, boxes, CAM boxes,
heatmaps) → response. Tokens are checked before any of this, by ``service.auth``.

Any ServiceError raised on the way becomes its status code through ``STATUS_CODES`` with
its own message, the request id, and a machine-readable reason in the trailing metadata
(``classifier-error-reason``: ``queue_full`` and ``server_busy`` mean "retry later",
``limit`` and ``invalid_image`` blame the request). Anything else is INTERNAL. Every
request succeeds or fails on its own, and no exception object outlives its call: a failed
image's pixels are released when the call ends, not at the next garbage collection.

Every call gets a request id (the caller's ``x-request-id``, or a new one), returned in
the trailing metadata and named in every error message, and one access-log line.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from service.auth import REFUSAL
from service.config import Settings
from service.decode_budget import DecodeBudget
from service.errors import (
    REASON_KEY,
    REQUEST_ID_KEY,
    DeadlineExceededError,
    InferenceError,
    InvalidArgumentError,
    InvalidImageError,
    LimitExceededError,
    NotFoundError,
    QueueFullError,
    ResourceExhaustedError,
    ServerBusyError,
    ServiceError,
    UnauthenticatedError,
    UnavailableError,
)
from service.memory import FreedMemory
from service.metrics import UNKNOWN_MODEL, Metrics
from service.model_spec import ModelSpec
from service.postprocess import heatmap, locate, top_k
from service.preprocess import Geometry, ImageLimits, preprocess_encoded, preprocess_raw
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.proto_gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from service.repository import ModelRepository, ModelVersion
from service.results import Box, Prediction

log = logging.getLogger(__name__)
access_log = logging.getLogger("service.access")


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

# What a client (the scoring engine, a gateway) needs to tell apart within one code.
REASONS: dict[type[ServiceError], str] = {
    QueueFullError: "queue_full",
    ServerBusyError: "server_busy",
    LimitExceededError: "limit",
    InvalidImageError: "invalid_image",
    InvalidArgumentError: "invalid_argument",
    NotFoundError: "not_found",
    ResourceExhaustedError: "resource_exhausted",
    DeadlineExceededError: "deadline",
    UnavailableError: "unavailable",
    UnauthenticatedError: "unauthenticated",
    InferenceError: "internal",
}


def _first_in_mro(error: ServiceError, table: dict[type[ServiceError], Any]) -> Any:
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return None


def status_code(error: ServiceError) -> grpc.StatusCode:
    return _first_in_mro(error, STATUS_CODES) or grpc.StatusCode.INTERNAL  # type: ignore[no-any-return]


def reason(error: ServiceError) -> str:
    return _first_in_mro(error, REASONS) or "internal"  # type: ignore[no-any-return]


def fail(context: Any, code: grpc.StatusCode, details: str, request_id: str, why: str) -> None:
    """End the call with an error status, without ``context.abort()``.

    ``abort`` works by raising: its exception's traceback holds the handler's frames, and
    with them the request message (up to 64 MB), in a reference cycle that only a full
    garbage collection frees. Setting the status and returning keeps no such cycle.
    """
    context.set_code(code)
    context.set_details(details)
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id), (REASON_KEY, why)))


def _drop_references(error: BaseException) -> None:
    """Cut an exception loose from the frames (and the decoded images in them) it keeps."""
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = None


Prepared = tuple[np.ndarray, Geometry, float]


def _prepare(
    image: pb.Image,
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
        kind = image.WhichOneof("data")
        if kind == "encoded":
            array, geometry = preprocess_encoded(
                image.encoded, spec, limits, index=index, budget=budget, deadline=deadline
            )
        elif kind == "raw":
            raw = image.raw
            array, geometry = preprocess_raw(
                raw.height,
                raw.width,
                raw.rgb,
                spec,
                limits,
                index=index,
                budget=budget,
                deadline=deadline,
            )
        else:
            raise InvalidImageError("has neither encoded bytes nor raw pixels", index=index)
        return array, geometry, time.perf_counter() - started
    except ServiceError as exc:
        _drop_references(exc)
        failure = exc
    except MemoryError:
        failure = ResourceExhaustedError(f"image {index}: not enough memory; retry later")
    except Exception as exc:  # a decoder bug must not become INTERNAL for the caller
        log.warning("image %d: unexpected %s while preprocessing", index, type(exc).__name__)
        failure = InvalidImageError(f"cannot process image: {exc}", index=index)
    return failure


def _predictions(items: Sequence[Prediction]) -> list[pb.Prediction]:
    return [pb.Prediction(index=p.index, label=p.label, score=p.score) for p in items]


def _box(box: Box) -> pb.Box:
    return pb.Box(
        x_min=box.x_min, y_min=box.y_min, x_max=box.x_max, y_max=box.y_max, score=box.score
    )


@dataclass
class CallInfo:
    """What one call's metrics and access-log line say; only served names reach it."""

    model: str
    version: str = ""
    images: int = 0


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


class ImageClassifierServicer(pb_grpc.ImageClassifierServicer):
    def __init__(
        self,
        settings: Settings,
        repository: ModelRepository,
        metrics: Metrics,
        preprocess_pool: Executor,
    ):
        self.settings = settings
        self.repository = repository
        self.metrics = metrics
        self.pool = preprocess_pool
        self.limits = settings.image_limits()
        self.freed = FreedMemory()
        self.budget = DecodeBudget(settings.max_decode_pixels, self.freed)
        self.inflight = InflightBytes(settings.max_inflight_bytes, self.freed)
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
        async def run(entry_request: Any, ctx: Any, call: CallInfo) -> Any:
            versions = self.repository.all_versions()
            return pb.ListModelsResponse(models=[self._model_info(v) for v in versions])

        return await self._call("ListModels", request, context, run)  # type: ignore[no-any-return]

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.ModelInfo:
        async def run(req: pb.GetModelRequest, ctx: Any, call: CallInfo) -> Any:
            entry = self.repository.resolve(req.model, req.version)
            call.model, call.version = entry.name, str(entry.version)
            return self._model_info(entry)

        return await self._call("GetModel", request, context, run)  # type: ignore[no-any-return]

    # --- the common envelope: errors, request id, metrics, access log --------------------

    def _initial_model_label(self, request: Any) -> str:
        name = getattr(request, "model", None)
        if name is None:
            return ""  # ListModels: no model involved
        return name if name and self.repository.is_served(name) else UNKNOWN_MODEL

    async def _call(self, method: str, request: Any, context: Any, handler: Any) -> Any:
        started = time.perf_counter()
        request_id = self.request_id(context)
        call = CallInfo(self._initial_model_label(request))
        code = grpc.StatusCode.OK
        message = why = ""
        try:
            response = await handler(request, context, call)
        except ServiceError as exc:
            code, message, why = status_code(exc), exc.message, reason(exc)
            _drop_references(exc)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("request %s %s failed unexpectedly", request_id, method)
            code, message, why = grpc.StatusCode.INTERNAL, "internal error", "internal"
        finally:
            self.account(method, call, code, started, request_id, context, message)
        if code is grpc.StatusCode.OK:
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            return response
        fail(context, code, f"{message} (request id {request_id})", request_id, why)
        return None

    def account(
        self,
        method: str,
        call: CallInfo,
        code: grpc.StatusCode,
        started: float,
        request_id: str,
        context: Any,
        message: str = "",
    ) -> None:
        """Metrics and the access-log line of one finished call."""
        seconds = time.perf_counter() - started
        m = self.metrics
        m.child(m.requests, call.model, call.version, method, code.name).inc()
        m.child(m.request_duration, call.model, method).observe(seconds)
        if self.settings.access_log and access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s %s",
                method,
                code.name,
                extra={
                    "request_id": request_id,
                    "method": method,
                    "model": call.model,
                    "version": call.version,
                    "images": call.images,
                    "code": code.name,
                    "ms": round(seconds * 1000, 2),
                    "peer": context.peer(),
                    "error": message or None,
                },
            )

    def request_id(self, context: Any) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_KEY and value:
                text = value if isinstance(value, str) else bytes(value).decode("ascii", "replace")
                cleaned = "".join(c for c in text[:64] if c.isprintable())
                if cleaned:
                    return cleaned
        # Unique per process and cheap (uuid4 reads the OS entropy pool on every call).
        return f"{self._id_prefix}-{next(self._ids):x}"

    async def refuse_unauthenticated(self, full_method: str, context: Any) -> None:
        """The auth gate's answer to a call without an accepted token (counted, logged)."""
        method = full_method.rsplit("/", 1)[-1]
        request_id = self.request_id(context)
        self.account(
            method,
            CallInfo(UNKNOWN_MODEL),
            grpc.StatusCode.UNAUTHENTICATED,
            time.perf_counter(),
            request_id,
            context,
            "missing or wrong token",
        )
        fail(
            context,
            grpc.StatusCode.UNAUTHENTICATED,
            f"{REFUSAL} (request id {request_id})",
            request_id,
            "unauthenticated",
        )

    # --- Classify / Localize ------------------------------------------------------------

    async def _infer(
        self, entry: ModelVersion, request: Any, context: Any, call: CallInfo
    ) -> tuple[list[dict[str, np.ndarray]], list[Geometry]]:
        count = len(request.images)
        call.images = count
        if count == 0:
            raise InvalidArgumentError("the request has no images")
        if count > self.settings.max_images_per_request:
            raise LimitExceededError(
                "images per request",
                count,
                self.settings.max_images_per_request,
                setting="max_images_per_request",
            )
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        assert entry.batcher is not None
        # Both admissions come before any decoding: a full server refuses at once. The
        # bytes are held until the answer is ready (the message lives as long as the call).
        with self.inflight.hold(request.ByteSize()):
            with entry.batcher.admit(count) as admission:
                loop = asyncio.get_running_loop()
                prepared = await asyncio.gather(
                    *(
                        loop.run_in_executor(
                            self.pool,
                            _prepare,
                            image,
                            entry.spec,
                            self.limits,
                            i,
                            self.budget,
                            deadline,
                        )
                        for i, image in enumerate(request.images)
                    )
                )
                arrays, geometries = [], []
                for item in prepared:
                    if isinstance(item, ServiceError):
                        raise item
                    arrays.append(item[0])
                    geometries.append(item[1])
                    self.metrics.preprocess_duration.observe(item[2])
                del prepared
                futures = admission.submit(arrays, deadline)
            try:
                rows = await asyncio.gather(*futures, return_exceptions=True)
            except asyncio.CancelledError:
                for future in futures:
                    future.cancel()  # the batcher drops them before compute
                raise
        for row in rows:
            if isinstance(row, BaseException):
                raise row
        self.metrics.child(self.metrics.images, call.model, call.version).inc(count)
        return rows, geometries  # type: ignore[return-value]

    def _top_k(self, request: Any, spec: ModelSpec) -> int:
        return min(request.top_k or self.settings.default_top_k, spec.num_classes)

    async def _classify(
        self, request: pb.ClassifyRequest, context: Any, call: CallInfo
    ) -> pb.ClassifyResponse:
        with self.repository.lease(request.model, request.version) as entry:
            call.model, call.version = entry.name, str(entry.version)
            spec = entry.spec  # the lease covers the runner; the spec outlives it
            rows, _ = await self._infer(entry, request, context, call)
        k = self._top_k(request, spec)
        results = [
            pb.Classification(
                predictions=_predictions(top_k(row[spec.outputs.probabilities], k, spec.labels))
            )
            for row in rows
        ]
        return pb.ClassifyResponse(model=entry.name, version=str(entry.version), results=results)

    async def _localize(
        self, request: pb.LocalizeRequest, context: Any, call: CallInfo
    ) -> pb.LocalizeResponse:
        with self.repository.lease(request.model, request.version) as entry:
            call.model, call.version = entry.name, str(entry.version)
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
            rows, geometries = await self._infer(entry, request, context, call)
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
