"""The data plane: what the server does, whatever the front door — inference, metadata and
configuration, readiness, and repository control — in domain types, never protobuf or HTTP.

The front doors (``service.server.grpc``: classifier.v1 and the Open Inference Protocol;
``service.server.http``: OIP over REST and the upload routes) are adapters: each turns its
wire format into the requests below, calls one method, and turns the answer back. So a
rule of serving (how a version is chosen and held, the default top-k, which outputs a
tensor call gets, when a load counts as failed) lives here once.

An inference call: lease the model version (a swap cannot unload it under the call) → the
online pipeline (``service.server.online``: admission, decode within the budget, the
batcher) → postprocessing (top-k, boxes, heatmaps, output tensors; the heavy parts in the
preprocess pool, off the event loop). Each method fills the call's ``CallInfo`` (model,
version, images) as it learns them, for the envelope's metrics and access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

from service import __version__
from service.model.errors import ServiceError, UnavailableError
from service.model.postprocess import check_can_localize, localizations, top_k
from service.model.results import Localization, Prediction
from service.model.spec import ModelSpec
from service.server.calls import CallInfo
from service.server.config import Settings
from service.server.domain import (
    Answer,
    ImageRequest,
    IndexEntry,
    ModelConfiguration,
    ModelMetadata,
    ModelSummary,
    ServerMetadata,
    TensorRequest,
    Traffic,
    summary,
)
from service.server.online import RequestPipeline, Row
from service.server.predictions import PredictionWatch
from service.server.repository import ModelRepository
from service.server.statistics import ModelStatistics, Stages, read_statistics
from service.server.tensors import (
    OutputTensor,
    check_outputs,
    default_outputs,
    images_from,
    model_inputs,
    model_outputs,
    outputs_for,
)
from service.server.traffic import checked_weights
from service.server.versions import ModelVersion, VersionState

SERVER_NAME = "imgclf"
PLATFORM = "onnxruntime_onnx"
# The Open Inference Protocol extensions both transports serve.
EXTENSIONS = ("classification", "model_repository", "model_configuration", "statistics")
# Repository states as the Open Inference Protocol's repository index names them.
INDEX_STATES = {
    VersionState.READY: "READY",
    VersionState.LOADING: "LOADING",
    VersionState.FAILED: "UNAVAILABLE",
    VersionState.UNLOADING: "UNLOADING",
}


# --- requests and answers ----------------------------------------------------------------


# --- the data plane ----------------------------------------------------------------------


class DataPlane:
    def __init__(
        self,
        settings: Settings,
        repository: ModelRepository,
        pipeline: RequestPipeline,
        ready: Callable[[], bool],
        label_for: Callable[[str | None], str],
    ):
        self.settings = settings
        self.repository = repository
        self.pipeline = pipeline
        self._ready = ready
        self._label_for = label_for  # the metrics label of a model name (CallLog's)
        self.predictions = PredictionWatch(
            pipeline.metrics, settings.prediction_classes_max, settings.prediction_watch
        )

    # --- readiness -------------------------------------------------------------------

    def server_ready(self) -> bool:
        return self._ready()

    def model_ready(self, call: CallInfo, name: str, version: str) -> bool:
        try:
            self._resolve(call, name, version)
        except ServiceError:
            return False
        return True

    # --- metadata and configuration --------------------------------------------------

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, __version__, EXTENSIONS)

    def model_metadata(self, call: CallInfo, name: str, version: str) -> ModelMetadata:
        entry = self._resolve(call, name, version)
        shapes = entry.runner.output_shapes if entry.runner else None
        return ModelMetadata(
            name=entry.name,
            versions=[
                str(e.version) for e in self.repository.ready_versions() if e.name == entry.name
            ],
            platform=PLATFORM,
            inputs=model_inputs(entry.spec),
            outputs=model_outputs(entry.spec, shapes),
        )

    def model_config(self, call: CallInfo, name: str, version: str) -> ModelConfiguration:
        entry, s = self._resolve(call, name, version), self.settings
        shapes = entry.runner.output_shapes if entry.runner else None
        return ModelConfiguration(
            name=entry.name,
            platform=PLATFORM,
            max_batch_size=(
                entry.batcher.config.max_batch_size if entry.batcher else s.max_batch_size
            ),
            inputs=model_inputs(entry.spec),
            outputs=model_outputs(entry.spec, shapes),
            max_queue_delay_us=s.max_queue_delay_us,
            preferred_batch_sizes=list(s.preferred_batch_sizes),
            instances=s.instances,
            on_gpu=entry.runner.on_gpu if entry.runner else False,
            version_policy=s.version_policy,
            versions=list(s.versions.get(entry.name, [])),
        )

    def model_summary(self, call: CallInfo, name: str, version: str) -> ModelSummary:
        return summary(self._resolve(call, name, version))

    def models(self) -> list[ModelSummary]:
        """Every version the server knows of: ready, loading, failed and unloading."""
        return [summary(e) for e in self.repository.all_versions()]

    # --- repository control ----------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        return [
            IndexEntry(e.name, str(e.version), INDEX_STATES[e.state], e.error or "")
            for e in self.repository.all_versions()
            if not ready_only or e.state is VersionState.READY
        ]

    async def load(self, call: CallInfo, name: str) -> None:
        """Rescan and serve ``name`` now; UNAVAILABLE unless a version of it is ready."""
        versions = await self.repository.load_model(name)
        call.model = self._label_for(name)
        if not any(v.state is VersionState.READY for v in versions):
            errors = "; ".join(f"version {v.version}: {v.error}" for v in versions)
            raise UnavailableError(f"model {name!r} did not load: {errors}")

    async def unload(self, call: CallInfo, name: str) -> None:
        call.model = self._label_for(name)
        await self.repository.unload_model(name)

    def traffic(self, call: CallInfo, name: str) -> Traffic:
        """How calls to ``name`` that name no version are split, and between what."""
        self._resolve(call, name, "")  # the errors of an unknown or unready model
        weights, source = self.repository.traffic.weights(name)
        ready = sorted(str(e.version) for e in self.repository.ready_versions() if e.name == name)
        return Traffic(name, {str(v): w for v, w in sorted(weights.items())}, source, ready)

    def set_traffic(self, call: CallInfo, name: str, weights: dict[str, float]) -> Traffic:
        """Publish the model's weights (its traffic file); every worker follows within a
        second."""
        self._resolve(call, name, "")
        checked = checked_weights(weights, f"the traffic weights of {name}")
        self.repository.traffic.publish(name, checked)
        return self.traffic(call, name)

    def clear_traffic(self, call: CallInfo, name: str) -> Traffic:
        """Withdraw the model's published weights (its traffic file)."""
        self._resolve(call, name, "")
        self.repository.traffic.withdraw(name)
        return self.traffic(call, name)

    # --- inference -------------------------------------------------------------------

    async def classify(
        self, call: CallInfo, request: ImageRequest
    ) -> Answer[list[list[Prediction]]]:
        with self._lease(call, request.model, request.version) as entry:
            spec = entry.spec  # the lease covers the runner; the spec outlives it
            rows, _ = await self.pipeline.run(
                entry, request.images, request.deadline, call, request.size_bytes
            )
        with self._output_stage(call, spec, rows):
            k = self._top_k(request.top_k, spec)
            results = [top_k(row[spec.outputs.probabilities], k, spec.labels) for row in rows]
        return Answer(entry.name, str(entry.version), results)

    async def localize(
        self, call: CallInfo, request: ImageRequest, include_heatmap: bool
    ) -> Answer[list[Localization]]:
        with self._lease(call, request.model, request.version) as entry:
            spec = entry.spec
            check_can_localize(spec, entry.name, include_heatmap)
            rows, geometries = await self.pipeline.run(
                entry, request.images, request.deadline, call, request.size_bytes
            )
        with self._output_stage(call, spec, rows):
            items = await asyncio.get_running_loop().run_in_executor(
                self.pipeline.pool,
                localizations,
                spec,
                rows,
                geometries,
                self._top_k(request.top_k, spec),
                include_heatmap,
                self.settings.heatmap_max_side,
            )
        return Answer(entry.name, str(entry.version), items)

    async def infer(self, call: CallInfo, request: TensorRequest) -> Answer[list[OutputTensor]]:
        with self._lease(call, request.model, request.version) as entry:
            spec = entry.spec
            requested = list(request.outputs) or default_outputs(spec)
            check_outputs(requested, spec)
            images = images_from(request.inputs, spec)
            rows, geometries = await self.pipeline.run(
                entry, images, request.deadline, call, request.size_bytes
            )
        with self._output_stage(call, spec, rows):
            outputs = await asyncio.get_running_loop().run_in_executor(
                self.pipeline.pool, outputs_for, spec, rows, geometries, requested
            )
        return Answer(entry.name, str(entry.version), outputs)

    # --- statistics ------------------------------------------------------------------

    def statistics(self, call: CallInfo, name: str, version: str) -> list[ModelStatistics]:
        """The statistics extension: every ready version (no name), a model's ready
        versions (no version), or one version; NOT_FOUND/UNAVAILABLE as a call would."""
        if name:
            if version:
                entry = self._resolve(call, name, version)
                keys = [(entry.name, str(entry.version))]
            else:
                self._resolve(call, name, "")  # the errors of an unknown or unready model
                keys = [
                    (e.name, str(e.version))
                    for e in self.repository.ready_versions()
                    if e.name == name
                ]
        else:
            keys = [(e.name, str(e.version)) for e in self.repository.ready_versions()]
        return read_statistics(self.pipeline.metrics.families(), sorted(keys))

    # --- helpers ---------------------------------------------------------------------

    def _top_k(self, asked: int, spec: ModelSpec) -> int:
        return min(asked or self.settings.default_top_k, spec.num_classes)

    def _resolve(self, call: CallInfo, name: str, version: str) -> ModelVersion:
        entry = self.repository.resolve(name, version)
        call.model, call.version = entry.name, str(entry.version)
        return entry

    @contextlib.contextmanager
    def _lease(self, call: CallInfo, name: str, version: str) -> Iterator[ModelVersion]:
        """``repository.lease``, labelling the call with the version it holds (from here
        on the call counts in that version's statistics)."""
        with self.repository.lease(name, version) as entry:
            call.model, call.version = entry.name, str(entry.version)
            call.stages = Stages()
            yield entry

    @contextlib.contextmanager
    def _output_stage(self, call: CallInfo, spec: ModelSpec, rows: Sequence[Row]) -> Iterator[None]:
        """Postprocessing, timed as the call's ``compute_output``; the answered images'
        top-1 classes go to the prediction watch first."""
        started = time.monotonic()
        self.predictions.record(call.model, call.version, spec, rows)
        yield
        if call.stages is not None:
            call.stages.output_started, call.stages.output_done = started, time.monotonic()
