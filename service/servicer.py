"""The classifier.v1 gRPC service: protobuf ⇄ domain types.

A request: lease the model version (a swap cannot unload it under the call) → the shared
pipeline (``service.online``: admission before decoding, decode within the budget,
the batcher) → postprocess (top-k, boxes, CAM boxes, heatmaps) → response. Errors,
request ids, metrics and the access log are the envelope's (``service.envelope``), and
status codes come from the one table in ``service.status``. Tokens are checked before any
of this, by ``service.auth``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from service.calls import CallInfo
from service.config import Settings
from service.envelope import Envelope
from service.model.postprocess import check_can_localize, localizations, top_k
from service.model.results import Box, Localization, Prediction
from service.model.spec import ModelSpec
from service.online import RequestPipeline, deadline_of
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.proto_gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from service.repository import ModelRepository, ModelVersion


def _predictions(items: Sequence[Prediction]) -> list[pb.Prediction]:
    return [pb.Prediction(index=p.index, label=p.label, score=p.score) for p in items]


def _box(box: Box) -> pb.Box:
    return pb.Box(
        x_min=box.x_min, y_min=box.y_min, x_max=box.x_max, y_max=box.y_max, score=box.score
    )


def _localization(item: Localization) -> pb.Localization:
    out = pb.Localization(
        predictions=_predictions(item.predictions), box=_box(item.box), box_source=item.box_source
    )
    if item.heatmap is not None:
        out.heatmap.height, out.heatmap.width = item.heatmap.height, item.heatmap.width
        out.heatmap.values.extend(item.heatmap.values.ravel().tolist())
    return out


def model_info(entry: ModelVersion) -> pb.ModelInfo:
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


class ImageClassifierServicer(pb_grpc.ImageClassifierServicer):
    def __init__(
        self,
        settings: Settings,
        repository: ModelRepository,
        pipeline: RequestPipeline,
        envelope: Envelope,
    ):
        self.settings = settings
        self.repository = repository
        self.pipeline = pipeline
        self.envelope = envelope

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyResponse:
        return await self.envelope.run(  # type: ignore[no-any-return]
            "Classify", request, context, self._classify, request.model
        )

    async def Localize(self, request: pb.LocalizeRequest, context: Any) -> pb.LocalizeResponse:
        return await self.envelope.run(  # type: ignore[no-any-return]
            "Localize", request, context, self._localize, request.model
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        async def run(req: Any, ctx: Any, call: CallInfo) -> Any:
            versions = self.repository.all_versions()
            return pb.ListModelsResponse(models=[model_info(v) for v in versions])

        return await self.envelope.run("ListModels", request, context, run)  # type: ignore[no-any-return]

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.ModelInfo:
        async def run(req: pb.GetModelRequest, ctx: Any, call: CallInfo) -> Any:
            entry = self.repository.resolve(req.model, req.version)
            call.model, call.version = entry.name, str(entry.version)
            return model_info(entry)

        return await self.envelope.run(  # type: ignore[no-any-return]
            "GetModel", request, context, run, request.model
        )

    def _top_k(self, request: Any, spec: ModelSpec) -> int:
        return min(request.top_k or self.settings.default_top_k, spec.num_classes)

    async def _classify(
        self, request: pb.ClassifyRequest, context: Any, call: CallInfo
    ) -> pb.ClassifyResponse:
        with self.repository.lease(request.model, request.version) as entry:
            call.model, call.version = entry.name, str(entry.version)
            spec = entry.spec  # the lease covers the runner; the spec outlives it
            rows, _ = await self.pipeline.run(
                entry,
                request.images,
                deadline_of(context.time_remaining()),
                call,
                request.ByteSize(),
            )
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
            check_can_localize(spec, entry.name, request.include_heatmap)
            rows, geometries = await self.pipeline.run(
                entry,
                request.images,
                deadline_of(context.time_remaining()),
                call,
                request.ByteSize(),
            )
        k = self._top_k(request, spec)
        items = await asyncio.get_running_loop().run_in_executor(
            self.pipeline.pool,
            localizations,
            spec,
            rows,
            geometries,
            k,
            request.include_heatmap,
            self.settings.heatmap_max_side,
        )
        results = [_localization(item) for item in items]
        return pb.LocalizeResponse(model=entry.name, version=str(entry.version), results=results)
