"""The local engine: the in-process pipeline (decode threads feeding ONNX Runtime batches).

No server and no gRPC: ``service.model.offline`` overlaps decoding with inference exactly as
the benchmark's in-process limit does. ``score_outputs`` turns one image's model outputs
into a row; the Ray engine's actors reuse it, so the two engines agree row for row.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from service.model.geometry import Geometry
from service.model.offline import run_pipeline
from service.model.postprocess import locate, top_k
from service.model.runner import Runner
from service.model.spec import ModelSpec
from service.scoring.rows import Row
from service.server.config import Settings
from service.server.config_loading import load_settings


def check_task(spec: ModelSpec, task: str) -> None:
    if task == "localize" and not spec.has_boxes and not spec.has_cam:
        raise ValueError(f"model {spec.name} cannot localize: no box head and no CAM outputs")


def score_outputs(
    path: str,
    outputs: dict[str, np.ndarray],
    geometry: Geometry,
    spec: ModelSpec,
    task: str,
    k: int,
    model: str,
    version: str,
) -> Row:
    predictions = top_k(outputs[spec.outputs.probabilities], k, spec.labels)
    if task != "localize":
        return Row.from_predictions(path, predictions, model, version)
    box, source = locate(outputs, geometry, spec, predictions[0].score)
    return Row.from_predictions(path, predictions, model, version, box, source)


class LocalEngine:
    def __init__(
        self,
        model_path: Path,
        *,
        task: str = "classify",
        top_k: int = 5,
        batch_size: int = 32,
        settings: Settings | None = None,
        version: str | None = None,
    ):
        """``version``: what the rows name (default: the folder above ``model_path``, as in
        a repository's ``<name>/<version>/model.onnx``)."""
        self.settings = settings or load_settings()
        self.runner = Runner(model_path, self.settings.runner_options())
        self.spec = self.runner.spec
        check_task(self.spec, task)
        self.task, self.top_k, self.batch_size = task, min(top_k, self.spec.num_classes), batch_size
        self.model = self.spec.name
        self.version = version if version is not None else Path(model_path).parent.name

    def score(self, paths: list[str]) -> Iterator[Row]:
        outcomes = run_pipeline(
            self.runner,
            paths,
            batch_size=self.batch_size,
            limits=self.settings.image_limits(),
            decode_threads=self.settings.decode_threads,
        )
        for outcome in outcomes:
            path = paths[outcome.index]
            if outcome.outputs is None or outcome.geometry is None:
                yield Row.failed(path, outcome.error or "unknown error", self.model, self.version)
            else:
                yield score_outputs(
                    path,
                    outcome.outputs,
                    outcome.geometry,
                    self.spec,
                    self.task,
                    self.top_k,
                    self.model,
                    self.version,
                )

    def close(self) -> None:
        pass
