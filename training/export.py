"""Checkpoint → self-describing, verified ONNX model in a versioned repository.

    models/<name>/<version>/model.onnx     (ModelSpec JSON under metadata key "model_spec")

The graph takes what clients send — uint8 NHWC at the model's fixed size, any batch — and
does the rest inside: ÷255 and mean/std, NHWC→NCHW, the network, softmax, the box head's
normalised xyxy, and for every backbone the top-k class activation maps (CAM_c = Σ_k w_ck
F_k, exact because the classifier is GAP + linear), so the server never needs torch to
localize with a classification-only model.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), opset 18. The
TorchScript exporter is deprecated in this torch line; the dynamo path is the maintained
one and handles the dynamic batch dimension through ``torch.export.Dim``.

Nothing reaches the repository unverified. The model is written to a hidden temp folder,
checked (``onnx.checker`` full check; PyTorch vs ONNX Runtime parity on real val images;
for INT8 a top-1 gate on the whole val split) and only then renamed into place, as a new
version. A failed check raises ``ExportError`` and leaves the repository untouched.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from service.model.layout import MODEL_FILE, next_version
from service.model.runner import Runner
from service.model.runner_options import CPU, RunnerOptions
from service.model.spec import (
    FP16_GATE_METRIC,
    DecodeMode,
    InputSpec,
    ModelSpec,
    OutputSpec,
    Precision,
    Task,
)
from training.checkpoint import LoadedModel, file_sha256, model_from_checkpoint
from training.decode_gate import measure_decode_gate, with_decode
from training.evaluate import evaluate_onnx
from training.gradcam import auto_layer, gradcam_localization
from training.models import ImageModel, InputNormalize
from training.quantize import Int8Options, check_fp16_accuracy, to_fp16, to_int8
from training.verify import (
    ExportError,
    ParityTolerance,
    check_model,
    check_parity,
    output_names,
    parity_batch,
    with_metrics,
    write_metadata,
)

__all__ = ["ExportError", "ExportOptions", "ExportResult", "ParityTolerance", "write_metadata"]

log = logging.getLogger(__name__)

OPSET = 18
EXPORTER = "torch.onnx.export(dynamo=True)"


@dataclass(frozen=True)
class ExportOptions:
    repository: Path = Path("models")
    name: str = "model"
    version: int | None = None
    data: Path | None = None  # default: the dataset the checkpoint was trained on
    cam_top_k: int = 5
    cam_threshold: float = 0.2
    precision: Precision = Precision.FP32
    parity_images: int = 32
    tolerance: ParityTolerance = field(default_factory=ParityTolerance)
    calibration_images: int = 128
    per_channel: str = "auto"  # auto | on | off
    max_int8_drop: float = 0.01  # top-1, as a fraction
    max_fp16_drop: float = 0.01  # top-1, as a fraction, measured on val as for INT8
    accept_drop: bool = False  # publish an FP16/INT8 model past its drop limit
    accept_slower: bool = False  # publish an INT8 model that is slower than FP32 here
    example_batch: int = 2
    # The gate for a checkpoint trained with ``jpeg_draft`` (training/decode_gate.py).
    full_decode: bool = False  # skip the gate: always write ``decode: full``
    decode_min_agreement: float = 0.995
    decode_max_top1_change: float = 0.002  # top-1, as a fraction
    # Grad-CAM's loc accuracy on val beside the CAM's (box data only; a forward and
    # backward pass over val, about as long as one more evaluation).
    gradcam_metrics: bool = True


@dataclass
class ExportResult:
    path: Path
    version: int
    spec: ModelSpec
    parity: dict[str, float]


class ExportGraph(nn.Module):
    """What the ONNX file computes: uint8 NHWC → probabilities[, boxes][, cam, cam_classes]."""

    def __init__(
        self, model: ImageModel, mean: tuple[float, ...], std: tuple[float, ...], cam_top_k: int
    ):
        super().__init__()
        self.model = model
        self.normalize = InputNormalize(mean, std)
        self.cam_top_k = cam_top_k

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.normalize(image.permute(0, 3, 1, 2))
        logits, boxes, features = self.model(x)
        probabilities = torch.softmax(logits, dim=1)
        out = [probabilities]
        if boxes is not None:
            out.append(boxes)
        if self.cam_top_k:
            classes = torch.topk(probabilities, self.cam_top_k, dim=1).indices
            weights = self.model.classifier.weight[classes]  # [B, k, C]
            out.append(torch.einsum("bkc,bchw->bkhw", weights, features))
            out.append(classes)
        return tuple(out)


def output_spec(with_boxes: bool, cam_top_k: int) -> OutputSpec:
    return OutputSpec(
        probabilities="probabilities",
        boxes="boxes" if with_boxes else None,
        cam="cam" if cam_top_k else None,
        cam_classes="cam_classes" if cam_top_k else None,
    )


def _versions() -> dict[str, str]:
    out = {"exporter": EXPORTER, "opset": str(OPSET)}
    for package in ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def export_graph(
    graph: ExportGraph, input_hw: tuple[int, int], names: list[str], path: Path, example_batch: int
) -> None:
    """torch → ONNX file with a dynamic batch axis (no metadata, not yet verified)."""
    h, w = input_hw
    example = torch.randint(0, 256, (example_batch, h, w, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    graph.eval()
    program = torch.onnx.export(
        graph,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=["image"],
        output_names=names,
        dynamic_shapes={"image": {0: batch}},
        verbose=False,
    )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.optimize()
    program.save(str(path))


def _spec(
    loaded: LoadedModel,
    options: ExportOptions,
    checkpoint: Path,
    outputs: OutputSpec,
    cam_top_k: int,
) -> ModelSpec:
    h, w = loaded.input_size
    metrics = {
        k: float(v)
        for k, v in loaded.metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    return ModelSpec(
        name=options.name,
        task=loaded.task,
        labels=loaded.classes,
        input=InputSpec(height=h, width=w),
        preprocessing=loaded.preprocessing,
        outputs=outputs,
        cam_threshold=options.cam_threshold,
        cam_top_k=cam_top_k,
        backbone=loaded.config.backbone,
        precision=Precision.FP32,
        metrics={f"val_{k}": v for k, v in metrics.items()},
        checkpoint_sha256=file_sha256(checkpoint),
        exporter=_versions(),
    )


def export_checkpoint(checkpoint: Path, options: ExportOptions) -> ExportResult:
    """Export, verify and publish one checkpoint as a new model version."""
    loaded = model_from_checkpoint(checkpoint)
    data = Path(options.data or loaded.config.data)
    if not data.is_dir():
        raise ExportError(
            f"the export checks need the labelled data the model was trained on; "
            f"{data} does not exist (pass --data ROOT)"
        )
    version = options.version or next_version(options.repository, options.name)
    final_dir = options.repository / options.name / str(version)
    if final_dir.exists():
        raise ExportError(f"{final_dir} already exists; versions are never overwritten")
    cam_top_k = min(options.cam_top_k, len(loaded.classes))
    outputs = output_spec(loaded.task is Task.LOCALIZATION, cam_top_k)
    graph = ExportGraph(
        loaded.model, loaded.preprocessing.mean, loaded.preprocessing.std, cam_top_k
    ).eval()
    spec = _spec(loaded, options, checkpoint, outputs, cam_top_k)
    (options.repository / options.name).mkdir(parents=True, exist_ok=True)
    with _staging(options.repository / options.name) as staging:
        path = staging / MODEL_FILE
        export_graph(graph, loaded.input_size, output_names(outputs), path, options.example_batch)
        write_metadata(path, spec)
        check_model(path)
        images = parity_batch(loaded, data, options.parity_images)
        parity = check_parity(graph, path, images, outputs, options.tolerance)
        log.info("parity fp32: %s", parity)
        # Before the ONNX metrics, so they are measured with the decode that is served.
        spec = _gate_decode(path, data, spec, options)
        write_metadata(path, spec)
        fp32_metrics = evaluate_onnx(path, data)
        spec = with_metrics(spec, fp32_metrics, prefix="onnx_")
        spec = _with_gradcam_metrics(spec, loaded, data, options)
        if options.precision is Precision.FP16:
            spec, parity = to_fp16(path, staging, spec, graph, images, outputs)
            write_metadata(path, spec)
            fp16_metrics = evaluate_onnx(path, data)
            drop = check_fp16_accuracy(
                fp32_metrics, fp16_metrics, options.max_fp16_drop, options.accept_drop
            )
            spec = with_metrics(spec, fp16_metrics, prefix="fp16_")
            gate = {
                "fp16_top1_drop": round(drop, 4),
                # What a GPU server reads to run TensorRT in FP16 by default.
                FP16_GATE_METRIC: 1.0 if drop <= options.max_fp16_drop else 0.0,
            }
            spec = spec.model_copy(update={"metrics": {**spec.metrics, **gate}})
        elif options.precision is Precision.INT8:
            int8 = Int8Options(
                options.calibration_images,
                options.per_channel,
                options.max_int8_drop,
                options.accept_drop,
                options.accept_slower,
            )
            spec = to_int8(path, staging, spec, loaded, data, fp32_metrics, int8)
        write_metadata(path, spec)
        check_model(path)
        Runner(path, RunnerOptions(providers=[CPU]))  # loads and matches its spec
        _publish(staging, path, final_dir)
    log.info("exported %s version %d to %s", options.name, version, final_dir)
    return ExportResult(path=final_dir / MODEL_FILE, version=version, spec=spec, parity=parity)


def _with_gradcam_metrics(
    spec: ModelSpec, loaded: LoadedModel, data: Path, options: ExportOptions
) -> ModelSpec:
    """Beside the exported CAM's loc accuracy (``onnx_cam_loc_acc``), Grad-CAM's at a finer
    stage, so the spec says which explanation of this model to trust."""
    if not options.gradcam_metrics:
        return spec
    found = gradcam_localization(loaded, data, threshold=options.cam_threshold)
    if found is None:
        return spec
    log.info(
        "Grad-CAM at %s: loc accuracy %.3f (exported CAM: %s)",
        auto_layer(loaded.model).name,
        found["loc_acc"],
        spec.metrics.get("onnx_cam_loc_acc", "none"),
    )
    extra = {f"gradcam_{k}": round(v, 4) for k, v in found.items()}
    return spec.model_copy(update={"metrics": {**spec.metrics, **extra}})


def _gate_decode(path: Path, data: Path, spec: ModelSpec, options: ExportOptions) -> ModelSpec:
    """Keep ``decode: jpeg_draft`` only if it leaves the model's answers as they were."""
    if spec.preprocessing.decode is not DecodeMode.JPEG_DRAFT:
        return spec
    if options.full_decode:
        log.info("decode: full (asked for)")
        return with_decode(spec, DecodeMode.FULL)
    gate = measure_decode_gate(
        path,
        data,
        min_agreement=options.decode_min_agreement,
        max_top1_change=options.decode_max_top1_change,
    )
    spec = spec.model_copy(update={"metrics": {**spec.metrics, **gate.metrics()}})
    summary = (
        f"JPEG draft decode vs full decode on {gate.images} val images "
        f"({gate.drafted} decoded at a reduced scale): top-1 agreement {gate.agreement:.2%}, "
        f"top-1 {gate.top1_draft:.2%} vs {gate.top1_full:.2%}"
    )
    if gate.passed:
        log.info("decode: jpeg_draft. %s", summary)
        return spec
    log.warning(
        "decode: full, because the draft decode changes this model's answers. %s "
        "(the gate: agreement >= %.1f%%, top-1 change <= %.1f pt)",
        summary,
        gate.min_agreement * 100,
        gate.max_top1_change * 100,
    )
    return with_decode(spec, DecodeMode.FULL)


@contextmanager
def _staging(folder: Path) -> Iterator[Path]:
    """A hidden temp folder next to the versions; removed unless published."""
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, path: Path, final_dir: Path) -> None:
    version_dir = staging / "version"
    version_dir.mkdir()
    os.replace(path, version_dir / MODEL_FILE)
    try:
        # rename() of a folder onto an existing, non-empty one fails: a version that
        # appeared meanwhile is never overwritten.
        os.rename(version_dir, final_dir)
    except OSError as exc:
        raise ExportError(f"cannot publish {final_dir}: {exc}") from exc
