"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``): a second
front door to the same data plane, so tritonclient, KServe and perf_analyzer clients work
unchanged. Protobuf ⇄ the data plane's types, nothing more.

The protobuf modules are the ones the ``tritonclient`` wheel ships (``grpc_service.proto``
of Triton, a superset of kserve's ``open_inference_grpc.proto`` with the same package and
field numbers, plus ``model_config.proto``). Taking them from there rather than compiling
our own copy means one definition of ``inference.*`` per process: a tritonclient client
and this server can share a process (the tests and the benchmark do), where two copies
would fail with "duplicate symbol 'inference.ServerLiveRequest'".

Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig
(enough for perf_analyzer's Triton mode), ModelInfer, ModelStreamInfer (many requests on
one stream, each answered or failed on its own), the statistics extension
(ModelStatistics, ``service.server.statistics``), and the repository extension
(RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload) with the lifecycle rules of
``service.server.repository``. The rest (shared memory, trace and log settings) answers
UNIMPLEMENTED. Inputs and outputs: ``service.server.tensors``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from service.model.errors import InvalidArgumentError
from service.server.calls import CallInfo
from service.server.dataplane import DataPlane
from service.server.domain import TensorRequest
from service.server.grpc.envelope import GrpcEnvelope
from service.server.grpc.streams import answer_each
from service.server.oip_config import config_message
from service.server.online import deadline_of
from service.server.statistics import Duration, ModelStatistics
from service.server.tensors import (
    CLASSIFICATION,
    InputTensor,
    OutputRequest,
    OutputTensor,
    TensorInfo,
    raw_of,
)

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

# Typed contents field for each datatype we send or accept.
_CONTENTS = {
    "BYTES": "bytes_contents",
    "FP32": "fp32_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
}


def _parameter(value: Any) -> Any:
    which = value.WhichOneof("parameter_choice")
    return getattr(value, which) if which else None


def requested_outputs(request: Any) -> list[OutputRequest]:
    out = []
    for output in request.outputs:
        parameters = {k: _parameter(v) for k, v in output.parameters.items()}
        class_count = int(parameters.pop(CLASSIFICATION, 0) or 0)
        out.append(OutputRequest(output.name, class_count, parameters))
    return out


def input_tensors(request: Any) -> list[InputTensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgumentError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    tensors = []
    for i, tensor in enumerate(request.inputs):
        typed = None
        if not raw:
            field = (
                "bytes_contents" if tensor.datatype == "BYTES" else _CONTENTS.get(tensor.datatype)
            )
            typed = list(getattr(tensor.contents, field)) if field else []
        tensors.append(
            InputTensor(
                tensor.name,
                tensor.datatype,
                list(tensor.shape),
                raw[i] if raw else None,
                typed,
            )
        )
    return tensors


def _put_output(response: Any, tensor: OutputTensor, raw: bool) -> None:
    out = response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    if raw:
        response.raw_output_contents.append(raw_of(tensor))
    else:
        getattr(out.contents, _CONTENTS[tensor.datatype]).extend(
            np.asarray(tensor.array).ravel().tolist()
        )


def _metadata_tensor(info: TensorInfo) -> Any:
    return oip.ModelMetadataResponse.TensorMetadata(
        name=info.name, datatype=info.datatype, shape=list(info.shape)
    )


def _duration(duration: Duration) -> Any:
    return oip.StatisticDuration(count=duration.count, ns=duration.ns)


def _statistics(stats: ModelStatistics) -> Any:
    return oip.ModelStatistics(
        name=stats.name,
        version=stats.version,
        last_inference=stats.last_inference,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=oip.InferStatistics(
            **{stat: _duration(d) for stat, d in stats.inference_stats.items()}
        ),
        batch_stats=[
            oip.InferBatchStatistics(
                batch_size=b.batch_size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for b in stats.batch_stats
        ],
    )


def add_to_server(servicer: InferenceServicer, server: Any) -> None:
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, envelope: GrpcEnvelope):
        self.plane = plane
        self.envelope = envelope

    # --- health and metadata ---------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return oip.ServerReadyResponse(ready=self.plane.server_ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        ready = self.plane.model_ready(CallInfo(""), request.name, request.version)
        return oip.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        async def run(call: CallInfo) -> Any:
            meta = self.plane.server_metadata()
            return oip.ServerMetadataResponse(
                name=meta.name, version=meta.version, extensions=list(meta.extensions)
            )

        return await self.envelope.run("ServerMetadata", context, run)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        async def run(call: CallInfo) -> Any:
            meta = self.plane.model_metadata(call, request.name, request.version)
            return oip.ModelMetadataResponse(
                name=meta.name,
                versions=meta.versions,
                platform=meta.platform,
                inputs=[_metadata_tensor(i) for i in meta.inputs],
                outputs=[_metadata_tensor(o) for o in meta.outputs],
            )

        return await self.envelope.run("ModelMetadata", context, run, request.name)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        async def run(call: CallInfo) -> Any:
            config = self.plane.model_config(call, request.name, request.version)
            return oip.ModelConfigResponse(config=config_message(config))

        return await self.envelope.run("ModelConfig", context, run, request.name)

    # --- inference -------------------------------------------------------------------

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        async def run(call: CallInfo) -> Any:
            return await self._infer(call, request, context)

        return await self.envelope.run("ModelInfer", context, run, request.model_name)

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        """Many requests on one stream (``service.server.grpc.streams``): each answered,
        or failed with ``error_message``, on its own, carrying the request's id."""

        async def answer(request: Any) -> Any:
            return await self._stream_answer(request, context)

        window = self.plane.settings.max_stream_requests
        async for item in answer_each(request_iterator, answer, window):
            yield item

    async def _stream_answer(self, request: Any, context: Any) -> Any:
        async def run(call: CallInfo) -> Any:
            return await self._infer(call, request, context)

        outcome = await self.envelope.run_for_stream(
            "ModelStreamInfer", context, run, request.model_name, request.id
        )
        if outcome.ok:
            return oip.ModelStreamInferResponse(infer_response=outcome.answer)
        return oip.ModelStreamInferResponse(
            error_message=f"{outcome.message} (request id {outcome.request_id})",
            infer_response=oip.ModelInferResponse(
                model_name=request.model_name,
                model_version=request.model_version,
                id=request.id,
            ),
        )

    async def _infer(self, call: CallInfo, request: Any, context: Any) -> Any:
        answer = await self.plane.infer(
            call,
            TensorRequest(
                model=request.model_name,
                version=request.model_version,
                inputs=input_tensors(request),
                outputs=requested_outputs(request),
                deadline=deadline_of(context.time_remaining()),
                size_bytes=request.ByteSize(),
            ),
        )
        response = oip.ModelInferResponse(
            model_name=answer.model, model_version=answer.version, id=request.id
        )
        raw = bool(request.raw_input_contents)  # answer in the form the client used
        for tensor in answer.results:
            _put_output(response, tensor, raw)
        return response

    # --- statistics extension --------------------------------------------------------

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        async def run(call: CallInfo) -> Any:
            stats = self.plane.statistics(call, request.name, request.version)
            return oip.ModelStatisticsResponse(model_stats=[_statistics(s) for s in stats])

        return await self.envelope.run("ModelStatistics", context, run, request.name or None)

    # --- repository extension --------------------------------------------------------

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        async def run(call: CallInfo) -> Any:
            models = [
                oip.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in self.plane.index(ready_only=request.ready)
            ]
            return oip.RepositoryIndexResponse(models=models)

        return await self.envelope.run("RepositoryIndex", context, run)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        async def run(call: CallInfo) -> Any:
            if request.parameters:
                raise InvalidArgumentError(
                    "load parameters (config or file overrides) are not supported; publish "
                    "the model file into the repository and load it by name"
                )
            await self.plane.load(call, request.model_name)
            return oip.RepositoryModelLoadResponse()

        return await self.envelope.run("RepositoryModelLoad", context, run)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        async def run(call: CallInfo) -> Any:
            await self.plane.unload(call, request.model_name)
            return oip.RepositoryModelUnloadResponse()

        return await self.envelope.run("RepositoryModelUnload", context, run)
