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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from service.model_spec import (
    METADATA_KEY,
    DecodeMode,
    InputSpec,
    ModelSpec,
    OutputSpec,
    Precision,
    Task,
)
from service.runner import CPU, Runner, RunnerOptions
from training.checkpoint import LoadedModel, file_sha256, model_from_checkpoint
from training.data import eval_decoder, load_dataset
from training.decode_gate import measure_decode_gate, with_decode
from training.evaluate import evaluate_onnx
from training.models import ImageModel, InputNormalize
from training.presets import eval_transform

log = logging.getLogger(__name__)

OPSET = 18
EXPORTER = "torch.onnx.export(dynamo=True)"
MODEL_FILE = "model.onnx"


class ExportError(RuntimeError):
    """A verification step failed; nothing was written to the repository."""


@dataclass(frozen=True)
class ParityTolerance:
    probability: float = 1e-4  # max |Δ| of any probability
    box: float = 1e-3  # max |Δ| of any normalised box coordinate
    cam_relative: float = 1e-3  # max |Δ| of a CAM, relative to that map's max |value|


FP16_TOLERANCE = ParityTolerance(probability=1e-2, box=1e-2, cam_relative=2e-2)


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
    tolerance: ParityTolerance = ParityTolerance()
    calibration_images: int = 128
    per_channel: str = "auto"  # auto | on | off
    max_int8_drop: float = 0.01  # top-1, as a fraction
    accept_drop: bool = False
    example_batch: int = 2
    # The gate for a checkpoint trained with ``jpeg_draft`` (training/decode_gate.py).
    full_decode: bool = False  # skip the gate: always write ``decode: full``
    decode_min_agreement: float = 0.995
    decode_max_top1_change: float = 0.002  # top-1, as a fraction


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


def _output_names(outputs: OutputSpec) -> list[str]:
    names = [outputs.probabilities, outputs.boxes, outputs.cam, outputs.cam_classes]
    return [n for n in names if n is not None]


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


def write_metadata(path: Path, spec: ModelSpec) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, spec.to_json()
    model.producer_name = "imgclf"
    onnx.save(model, str(path))


def check_model(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {exc}") from exc


def parity_batch(loaded: LoadedModel, data: Path, n: int, split: str = "val") -> np.ndarray:
    """``n`` real images of ``split`` through the eval preprocessing: uint8 [n, H, W, 3]."""
    index = load_dataset(
        data, splits=(split,), classes=loaded.classes, manifest=loaded.config.manifest
    )
    samples = index.splits[split].samples
    if len(samples) < n:
        raise ExportError(
            f"{data}: {split} has {len(samples)} usable images; the export checks need {n}"
        )
    step = max(1, len(samples) // n)
    h, w = loaded.input_size
    transform = eval_transform(loaded.preprocessing, h, w)
    decode = eval_decoder(loaded.preprocessing, h, w)
    images = [transform(decode(str(s.path))).permute(1, 2, 0).numpy() for s in samples[::step][:n]]
    return np.ascontiguousarray(np.stack(images))


def compare(
    reference: tuple[torch.Tensor, ...],
    got: dict[str, np.ndarray],
    outputs: OutputSpec,
    tolerance: ParityTolerance,
) -> dict[str, float]:
    """Max deviations of ORT from PyTorch; raises ExportError past the tolerance."""
    ref = dict(zip(_output_names(outputs), (t.detach().numpy() for t in reference), strict=True))
    report: dict[str, float] = {}
    failures = []
    p_ref, p_got = ref[outputs.probabilities], got[outputs.probabilities]
    report["max_abs_probability"] = float(np.abs(p_ref - p_got).max())
    report["top1_agreement"] = float((p_ref.argmax(1) == p_got.argmax(1)).mean())
    if report["max_abs_probability"] > tolerance.probability:
        failures.append(
            f"probabilities differ by {report['max_abs_probability']:.2e} "
            f"(limit {tolerance.probability:.0e})"
        )
    if report["top1_agreement"] < 1.0 and tolerance is not FP16_TOLERANCE:
        failures.append(f"top-1 differs on {1 - report['top1_agreement']:.1%} of the images")
    if outputs.boxes is not None:
        report["max_abs_box"] = float(np.abs(ref[outputs.boxes] - got[outputs.boxes]).max())
        if report["max_abs_box"] > tolerance.box:
            failures.append(
                f"boxes differ by {report['max_abs_box']:.2e} (limit {tolerance.box:.0e})"
            )
    if outputs.cam is not None and outputs.cam_classes is not None:
        same_classes = ref[outputs.cam_classes] == got[outputs.cam_classes]
        cam_ref, cam_got = ref[outputs.cam], got[outputs.cam]
        scale = np.abs(cam_ref).max(axis=(2, 3), keepdims=True) + 1e-12
        rel = np.abs(cam_ref - cam_got) / scale
        # Classes tied in probability may come out of top-k in another order; compare
        # maps where both sides chose the same class.
        report["max_rel_cam"] = float(rel[same_classes].max()) if same_classes.any() else 0.0
        if report["max_rel_cam"] > tolerance.cam_relative:
            failures.append(
                f"CAMs differ by {report['max_rel_cam']:.2e} of their max "
                f"(limit {tolerance.cam_relative:.0e})"
            )
    if failures:
        raise ExportError("PyTorch/ONNX Runtime parity failed: " + "; ".join(failures))
    return report


def check_parity(
    graph: ExportGraph,
    path: Path,
    images: np.ndarray,
    outputs: OutputSpec,
    tolerance: ParityTolerance,
) -> dict[str, float]:
    with torch.no_grad():
        reference = graph(torch.from_numpy(images))
    runner = Runner(path, RunnerOptions(providers=[CPU]))
    got = runner.run(images)
    return compare(reference, got, outputs, tolerance)


def next_version(repository: Path, name: str) -> int:
    folder = repository / name
    versions = (
        [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
        if folder.is_dir()
        else []
    )
    return max(versions, default=0) + 1


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
        export_graph(graph, loaded.input_size, _output_names(outputs), path, options.example_batch)
        write_metadata(path, spec)
        check_model(path)
        images = parity_batch(loaded, data, options.parity_images)
        parity = check_parity(graph, path, images, outputs, options.tolerance)
        log.info("parity fp32: %s", parity)
        # Before the ONNX metrics, so they are measured with the decode that is served.
        spec = _gate_decode(path, data, spec, options)
        write_metadata(path, spec)
        fp32_metrics = evaluate_onnx(path, data)
        spec = _with_metrics(spec, fp32_metrics, prefix="onnx_")
        if options.precision is Precision.FP16:
            spec, parity = _to_fp16(path, staging, spec, graph, images, outputs)
            write_metadata(path, spec)
            spec = _with_metrics(spec, evaluate_onnx(path, data), prefix="fp16_")
        elif options.precision is Precision.INT8:
            spec = _to_int8(path, staging, spec, loaded, data, fp32_metrics, options)
        write_metadata(path, spec)
        check_model(path)
        Runner(path, RunnerOptions(providers=[CPU]))  # loads and matches its spec
        _publish(staging, path, final_dir)
    log.info("exported %s version %d to %s", options.name, version, final_dir)
    return ExportResult(path=final_dir / MODEL_FILE, version=version, spec=spec, parity=parity)


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


def _with_metrics(spec: ModelSpec, metrics: dict[str, Any], prefix: str) -> ModelSpec:
    keys = ("top1", "top5", "loc_acc", "mean_iou", "cam_loc_acc", "cam_mean_iou")
    extra = {f"{prefix}{k}": round(float(metrics[k]), 4) for k in keys if k in metrics}
    return spec.model_copy(update={"metrics": {**spec.metrics, **extra}})


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


def _to_fp16(
    path: Path,
    staging: Path,
    spec: ModelSpec,
    graph: ExportGraph,
    images: np.ndarray,
    outputs: OutputSpec,
) -> tuple[ModelSpec, dict[str, float]]:
    from onnxconverter_common import float16

    model = onnx.load(str(path))
    # uint8 input and float32 outputs stay as they are; the network runs in float16. Cast
    # nodes stay as exported (the converter would retype their outputs but not their
    # "to" attribute) and get a float16 boundary after them instead.
    casts = [node.name for node in model.graph.node if node.op_type == "Cast"]
    converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=casts)
    onnx.save(converted, str(path))
    parity = check_parity(graph, path, images, outputs, FP16_TOLERANCE)
    log.info("parity fp16: %s", parity)
    return spec.model_copy(update={"precision": Precision.FP16}), parity


def measure_latency(
    path: Path, input_hw: tuple[int, int], batch: int = 8, threads: int = 2, repeats: int = 30
) -> float:
    """Median seconds per batch of ``batch`` on the CPU with ``threads`` intra-op threads."""
    runner = Runner(path, RunnerOptions(providers=[CPU], intra_op_threads=threads))
    images = np.random.default_rng(0).integers(0, 256, (batch, *input_hw, 3), dtype=np.uint8)
    for _ in range(5):
        runner.run(images)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.run(images)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


class _CalibrationReader:
    """Feeds eval-preprocessed training images to the INT8 calibrator."""

    def __init__(self, images: np.ndarray, batch: int = 16):
        self.batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {"image": self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


def _quantize(source: Path, target: Path, images: np.ndarray, per_channel: bool) -> None:
    from onnxruntime import quantization as q

    reader = _CalibrationReader(images)
    q.quantize_static(
        str(source),
        str(target),
        reader,  # type: ignore[arg-type]
        quant_format=q.QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=q.QuantType.QUInt8,
        weight_type=q.QuantType.QInt8,
        # Convolutions are where the time goes; the small heads (classifier, box MLP, CAM)
        # stay in float, which keeps probabilities, boxes and CAMs accurate.
        op_types_to_quantize=["Conv"],
        calibrate_method=q.CalibrationMethod.MinMax,
    )


def _to_int8(
    path: Path,
    staging: Path,
    spec: ModelSpec,
    loaded: LoadedModel,
    data: Path,
    fp32: dict[str, Any],
    options: ExportOptions,
) -> ModelSpec:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = staging / "prepared.onnx"
    quant_pre_process(str(path), str(prepared), skip_symbolic_shape=False)
    calibration = parity_batch(loaded, data, options.calibration_images, split="train")
    choices = {"auto": [True, False], "on": [True], "off": [False]}[options.per_channel]
    best: tuple[float, bool, Path, dict[str, Any]] | None = None
    for per_channel in choices:
        candidate = staging / f"int8-{'pc' if per_channel else 'pt'}.onnx"
        _quantize(prepared, candidate, calibration, per_channel)
        write_metadata(candidate, spec)
        metrics = evaluate_onnx(candidate, data)
        drop = float(fp32["top1"]) - float(metrics["top1"])
        log.info(
            "int8 per_channel=%s: top1 %.4f (fp32 %.4f, drop %.4f)",
            per_channel,
            metrics["top1"],
            fp32["top1"],
            drop,
        )
        if best is None or drop < best[0] - 1e-9:
            best = (drop, per_channel, candidate, metrics)
    assert best is not None
    drop, per_channel, candidate, metrics = best
    if drop > options.max_int8_drop and not options.accept_drop:
        raise ExportError(
            f"INT8 top-1 is {metrics['top1']:.4f} against {fp32['top1']:.4f} in FP32: a drop of "
            f"{drop * 100:.2f} points, over the {options.max_int8_drop * 100:.1f}-point limit "
            "(pass --accept-drop to publish it anyway)"
        )
    # Whether INT8 pays off depends on the CPU (VNNI) and on how much of the graph has
    # integer kernels; measure it here rather than assume it.
    hw = loaded.input_size
    fp32_s, int8_s = measure_latency(path, hw), measure_latency(candidate, hw)
    speedup = fp32_s / int8_s
    log.info(
        "int8 latency %.2f ms vs fp32 %.2f ms per batch of 8 (2 threads): %.2fx",
        int8_s * 1e3,
        fp32_s * 1e3,
        speedup,
    )
    if speedup < 1.0:
        log.warning(
            "INT8 is slower than FP32 for this model on this CPU (%.2fx); ONNX Runtime "
            "lacks integer kernels for some of its operators",
            speedup,
        )
    os.replace(candidate, path)
    spec = _with_metrics(spec, metrics, prefix="int8_")
    quant = {
        "int8_top1_drop": round(drop, 4),
        "int8_per_channel": float(per_channel),
        "int8_calibration_images": float(len(calibration)),
        "int8_cpu_speedup_b8_t2": round(speedup, 3),
    }
    if "loc_acc" in metrics and "loc_acc" in fp32:
        quant["int8_loc_acc_drop"] = round(float(fp32["loc_acc"]) - float(metrics["loc_acc"]), 4)
    return spec.model_copy(
        update={"precision": Precision.INT8, "metrics": {**spec.metrics, **quant}}
    )
