"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``): a second
front door to the same pipeline, so tritonclient, KServe and perf_analyzer clients work
unchanged.

The protobuf modules are the ones the ``tritonclient`` wheel ships (``grpc_service.proto``
of Triton, a superset of kserve's ``open_inference_grpc.proto`` with the same package and
field numbers, plus ``model_config.proto``). Taking them from there rather than compiling
our own copy means one definition of ``inference.*`` per process: a tritonclient client
and this server can share a process (the tests and the benchmark do), where two copies
would fail with "duplicate symbol 'inference.ServerLiveRequest'".

Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig
(enough for perf_analyzer's Triton mode), ModelInfer, and the repository extension
(RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload) with the lifecycle rules of
``service.repository``. The rest (streaming, statistics, shared memory, trace, logging)
answers UNIMPLEMENTED. Inputs and outputs: ``service.tensors``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from service import __version__
from service.calls import CallInfo
from service.config import Settings
from service.envelope import Envelope
from service.model.errors import InvalidArgumentError, ServiceError, UnavailableError
from service.online import RequestPipeline, deadline_of
from service.repository import ModelRepository, ModelVersion, VersionState
from service.tensors import (
    CLASSIFICATION,
    InputTensor,
    OutputRequest,
    OutputTensor,
    TensorInfo,
    check_outputs,
    default_outputs,
    images_from,
    model_inputs,
    model_outputs,
    outputs_for,
    raw_of,
)

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "imgclf"
EXTENSIONS = ["classification", "model_repository", "model_configuration"]
PLATFORM = "onnxruntime_onnx"

_CONFIG_TYPES = {
    "FP32": mc.TYPE_FP32,
    "INT64": mc.TYPE_INT64,
    "UINT8": mc.TYPE_UINT8,
    "BYTES": mc.TYPE_STRING,
}
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


def _config_io(info: TensorInfo, message: Any) -> Any:
    # Triton's convention with max_batch_size > 0: dims leave out the batch dimension;
    # a per-image scalar is dims [1] reshaped to [].
    dims = list(info.shape[1:]) or [1]
    kwargs: dict[str, Any] = {"name": info.name, "data_type": _CONFIG_TYPES[info.datatype]}
    if message is mc.ModelInput:
        kwargs["optional"] = info.optional
    item = message(dims=dims, **kwargs)
    if not info.shape[1:]:
        item.reshape.shape[:] = []
        item.reshape.SetInParent()
    return item


def add_to_server(servicer: InferenceServicer, server: Any) -> None:
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        settings: Settings,
        repository: ModelRepository,
        pipeline: RequestPipeline,
        envelope: Envelope,
        ready: Callable[[], bool],
    ):
        self.settings = settings
        self.repository = repository
        self.pipeline = pipeline
        self.envelope = envelope
        self.ready = ready

    # --- health and metadata ---------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return oip.ServerReadyResponse(ready=self.ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            self.repository.resolve(request.name, request.version)
        except ServiceError:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        async def run(req: Any, ctx: Any, call: CallInfo) -> Any:
            return oip.ServerMetadataResponse(
                name=SERVER_NAME, version=__version__, extensions=EXTENSIONS
            )

        return await self.envelope.run("ServerMetadata", request, context, run)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        async def run(req: Any, ctx: Any, call: CallInfo) -> Any:
            entry = self._resolve(req.name, req.version, call)
            spec = entry.spec
            shapes = entry.runner.output_shapes if entry.runner else None
            return oip.ModelMetadataResponse(
                name=entry.name,
                versions=self._served_versions(entry.name),
                platform=PLATFORM,
                inputs=[_metadata_tensor(i) for i in model_inputs(spec)],
                outputs=[_metadata_tensor(o) for o in model_outputs(spec, shapes)],
            )

        return await self.envelope.run("ModelMetadata", request, context, run, request.name)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        async def run(req: Any, ctx: Any, call: CallInfo) -> Any:
            entry = self._resolve(req.name, req.version, call)
            return oip.ModelConfigResponse(config=self.model_config(entry))

        return await self.envelope.run("ModelConfig", request, context, run, request.name)

    def model_config(self, entry: ModelVersion) -> Any:
        spec, s = entry.spec, self.settings
        shapes = entry.runner.output_shapes if entry.runner else None
        batcher = entry.batcher.config if entry.batcher else None
        config = mc.ModelConfig(
            name=entry.name,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=batcher.max_batch_size if batcher else s.max_batch_size,
            input=[_config_io(i, mc.ModelInput) for i in model_inputs(spec)],
            output=[_config_io(o, mc.ModelOutput) for o in model_outputs(spec, shapes)],
        )
        config.dynamic_batching.max_queue_delay_microseconds = s.max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(s.preferred_batch_sizes)
        gpu = bool(entry.runner) and entry.runner.active_providers[0] != "CPUExecutionProvider"  # type: ignore[union-attr]
        config.instance_group.add(
            count=s.instances,
            kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU,
        )
        policy = config.version_policy
        if s.version_policy == "latest":
            policy.latest.num_versions = 1
        elif s.version_policy == "all":
            policy.all.SetInParent()
        else:
            policy.specific.versions.extend(s.versions.get(entry.name, []))
        return config

    # --- inference -------------------------------------------------------------------

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self.envelope.run(
            "ModelInfer", request, context, self._infer, request.model_name
        )

    async def _infer(self, request: Any, context: Any, call: CallInfo) -> Any:
        with self.repository.lease(request.model_name, request.model_version) as entry:
            call.model, call.version = entry.name, str(entry.version)
            spec = entry.spec
            requested = requested_outputs(request) or default_outputs(spec)
            check_outputs(requested, spec)
            images = images_from(input_tensors(request), spec)
            rows, geometries = await self.pipeline.run(
                entry,
                images,
                deadline_of(context.time_remaining()),
                call,
                request.ByteSize(),
            )
        outputs = await asyncio.get_running_loop().run_in_executor(
            self.pipeline.pool, outputs_for, spec, rows, geometries, requested
        )
        response = oip.ModelInferResponse(
            model_name=entry.name, model_version=str(entry.version), id=request.id
        )
        raw = bool(request.raw_input_contents)  # answer in the form the client used
        for tensor in outputs:
            _put_output(response, tensor, raw)
        return response

    # --- repository extension --------------------------------------------------------

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        async def run(req: Any, ctx: Any, call: CallInfo) -> Any:
            states = {
                VersionState.READY: "READY",
                VersionState.LOADING: "LOADING",
                VersionState.FAILED: "UNAVAILABLE",
                VersionState.UNLOADING: "UNLOADING",
            }
            models = [
                oip.RepositoryIndexResponse.ModelIndex(
                    name=e.name,
                    version=str(e.version),
                    state=states[e.state],
                    reason=e.error or "",
                )
                for e in self.repository.all_versions()
                if not req.ready or e.state is VersionState.READY
            ]
            return oip.RepositoryIndexResponse(models=models)

        return await self.envelope.run("RepositoryIndex", request, context, run)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        async def run(req: Any, ctx: Any, call: CallInfo) -> Any:
            if req.parameters:
                raise InvalidArgumentError(
                    "load parameters (config or file overrides) are not supported; publish "
                    "the model file into the repository and load it by name"
                )
            versions = await self.repository.load_model(req.model_name)
            call.model = self.envelope.calls.label_for(req.model_name)
            if not any(v.state is VersionState.READY for v in versions):
                errors = "; ".join(f"version {v.version}: {v.error}" for v in versions)
                raise UnavailableError(f"model {req.model_name!r} did not load: {errors}")
            return oip.RepositoryModelLoadResponse()

        return await self.envelope.run("RepositoryModelLoad", request, context, run)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        async def run(req: Any, ctx: Any, call: CallInfo) -> Any:
            call.model = self.envelope.calls.label_for(req.model_name)
            await self.repository.unload_model(req.model_name)
            return oip.RepositoryModelUnloadResponse()

        return await self.envelope.run("RepositoryModelUnload", request, context, run)

    # --- helpers ---------------------------------------------------------------------

    def _resolve(self, name: str, version: str, call: CallInfo) -> ModelVersion:
        entry = self.repository.resolve(name, version)
        call.model, call.version = entry.name, str(entry.version)
        return entry

    def _served_versions(self, name: str) -> list[str]:
        return [str(e.version) for e in self.repository.ready_versions() if e.name == name]
