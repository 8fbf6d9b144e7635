"""The classifier.v1 gRPC service: protobuf ⇄ the data plane's types, nothing more.

Each method runs in the call envelope (``GrpcEnvelope``: request id, errors → status and
trailers, metrics, access log); the work is the data plane's (``service.server.dataplane``).
Tokens are checked before any of this, by the gate in ``service.server.grpc.auth``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.model.errors import InvalidArgumentError
from service.model.results import Box, Localization, Prediction
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.proto_gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from service.server.calls import CallInfo
from service.server.dataplane import DataPlane
from service.server.domain import ImageRequest, ModelSummary
from service.server.grpc.envelope import GrpcEnvelope
from service.server.grpc.streams import answer_each
from service.server.online import deadline_of


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


def model_info(model: ModelSummary) -> pb.ModelInfo:
    info = pb.ModelInfo(
        name=model.name, version=model.version, state=model.state.value, error=model.error
    )
    spec = model.spec
    if spec is None:
        return info
    info.task = spec.task.value
    info.labels.extend(spec.labels)
    info.input_height, info.input_width = spec.input.height, spec.input.width
    info.resize_mode = spec.preprocessing.resize_mode.value
    info.has_boxes, info.has_cam = spec.has_boxes, spec.has_cam
    info.backbone, info.precision = spec.backbone, spec.precision.value
    info.metrics.update(spec.metrics)
    info.max_batch_size = model.max_batch_size
    info.providers.extend(model.providers)
    info.model_spec_json = spec.to_json()
    return info


def image_request(request: Any, context: Any) -> ImageRequest:
    return ImageRequest(
        model=request.model,
        version=request.version,
        images=request.images,
        top_k=request.top_k,
        deadline=deadline_of(context.time_remaining()),
        size_bytes=request.ByteSize(),
    )


class ImageClassifierServicer(pb_grpc.ImageClassifierServicer):
    def __init__(self, plane: DataPlane, envelope: GrpcEnvelope):
        self.plane = plane
        self.envelope = envelope

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyResponse:
        async def run(call: CallInfo) -> pb.ClassifyResponse:
            return await self._classify(call, request, context)

        return await self.envelope.run("Classify", context, run, request.model)  # type: ignore[no-any-return]

    async def Localize(self, request: pb.LocalizeRequest, context: Any) -> pb.LocalizeResponse:
        async def run(call: CallInfo) -> pb.LocalizeResponse:
            return await self._localize(call, request, context)

        return await self.envelope.run("Localize", context, run, request.model)  # type: ignore[no-any-return]

    async def Stream(self, request_iterator: Any, context: Any) -> Any:
        """Classify and Localize requests on one stream (``service.server.grpc.streams``),
        each answered or failed on its own, with its id."""

        async def answer(request: pb.StreamRequest) -> pb.StreamResponse:
            return await self._stream_answer(request, context)

        window = self.plane.settings.max_stream_requests
        async for item in answer_each(request_iterator, answer, window):
            yield item

    async def _stream_answer(self, request: pb.StreamRequest, context: Any) -> pb.StreamResponse:
        kind = request.WhichOneof("call")

        async def run(call: CallInfo) -> pb.StreamResponse:
            if kind == "classify":
                return pb.StreamResponse(
                    classify=await self._classify(call, request.classify, context)
                )
            if kind == "localize":
                return pb.StreamResponse(
                    localize=await self._localize(call, request.localize, context)
                )
            raise InvalidArgumentError("a stream request needs classify or localize")

        method = f"Stream{kind.title()}" if kind else "Stream"
        model = getattr(request, kind).model if kind else None
        outcome = await self.envelope.run_for_stream(method, context, run, model, request.id)
        if outcome.ok:
            response: pb.StreamResponse = outcome.answer
        else:
            response = pb.StreamResponse(
                error=pb.StreamError(
                    code=outcome.code.name,
                    message=f"{outcome.message} (request id {outcome.request_id})",
                    reason=outcome.reason,
                )
            )
        response.id = request.id
        return response

    async def _classify(
        self, call: CallInfo, request: pb.ClassifyRequest, context: Any
    ) -> pb.ClassifyResponse:
        answer = await self.plane.classify(call, image_request(request, context))
        results = [pb.Classification(predictions=_predictions(p)) for p in answer.results]
        return pb.ClassifyResponse(model=answer.model, version=answer.version, results=results)

    async def _localize(
        self, call: CallInfo, request: pb.LocalizeRequest, context: Any
    ) -> pb.LocalizeResponse:
        answer = await self.plane.localize(
            call, image_request(request, context), request.include_heatmap
        )
        results = [_localization(item) for item in answer.results]
        return pb.LocalizeResponse(model=answer.model, version=answer.version, results=results)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        async def run(call: CallInfo) -> pb.ListModelsResponse:
            return pb.ListModelsResponse(models=[model_info(m) for m in self.plane.models()])

        return await self.envelope.run("ListModels", context, run)  # type: ignore[no-any-return]

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.ModelInfo:
        async def run(call: CallInfo) -> pb.ModelInfo:
            return model_info(self.plane.model_summary(call, request.model, request.version))

        return await self.envelope.run("GetModel", context, run, request.model)  # type: ignore[no-any-return]
