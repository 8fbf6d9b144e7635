"""Reduced precision at export: FP16 for GPUs (with a parity check at FP16's tolerance),
static INT8 (QDQ, calibrated on training images) for CPUs with a top-1 gate on the whole
val split, and the CPU latency measurement that says whether INT8 pays off here.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from torch import nn

from service.model.runner import Runner
from service.model.runner_options import CPU, RunnerOptions
from service.model.spec import ModelSpec, OutputSpec, Precision
from training.checkpoint import LoadedModel
from training.evaluate import evaluate_onnx
from training.verify import (
    FP16_TOLERANCE,
    ExportError,
    check_parity,
    parity_batch,
    with_metrics,
    write_metadata,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Options:
    calibration_images: int = 128
    per_channel: str = "auto"  # auto | on | off
    max_int8_drop: float = 0.01  # top-1, as a fraction
    accept_drop: bool = False
    accept_slower: bool = False  # publish an INT8 model slower than FP32 here


FP32_OPS = ("Cast", "GridSample")
# The torch.onnx (dynamo) exporter records each node's module path in this metadata.
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def _stays_fp32(node: onnx.NodeProto) -> bool:
    if node.op_type in FP32_OPS:
        return True
    scopes = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES_KEY), "")
    return "'model.glimpse'" in scopes


def to_fp16(
    path: Path,
    staging: Path,
    spec: ModelSpec,
    graph: nn.Module,
    images: np.ndarray,
    outputs: OutputSpec,
) -> tuple[ModelSpec, dict[str, float]]:
    from onnxconverter_common import float16

    model = onnx.load(str(path))
    # uint8 input and float32 outputs stay as they are; the network runs in float16. Cast
    # nodes stay as exported (the converter would retype their outputs but not their
    # "to" attribute) and get a float16 boundary after them instead. The glimpse head
    # stays float32 as a whole: ONNX Runtime's CPU GridSample has no float16 kernel, and
    # its box arithmetic reads the "boxes" graph output, which the converter mistypes
    # when a float16 node consumes it.
    kept = [node.name for node in model.graph.node if _stays_fp32(node)]
    converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=kept)
    onnx.save(converted, str(path))
    parity = check_parity(graph, path, images, outputs, FP16_TOLERANCE)
    log.info("parity fp16: %s", parity)
    return spec.model_copy(update={"precision": Precision.FP16}), parity


def check_fp16_accuracy(
    fp32: dict[str, Any], fp16: dict[str, Any], max_drop: float, accept_drop: bool
) -> float:
    """FP16's top-1 drop on the whole val split; refused past ``max_drop`` unless accepted."""
    drop = float(fp32["top1"]) - float(fp16["top1"])
    log.info("fp16: top1 %.4f (fp32 %.4f, drop %.4f)", fp16["top1"], fp32["top1"], drop)
    if drop > max_drop and not accept_drop:
        raise ExportError(
            f"FP16 top-1 is {fp16['top1']:.4f} against {fp32['top1']:.4f} in FP32: a drop of "
            f"{drop * 100:.2f} points, over the {max_drop * 100:.1f}-point limit "
            "(pass --accept-drop to publish it anyway)"
        )
    return drop


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


def downstream_of(model: onnx.ModelProto, op_type: str) -> list[str]:
    """Names of the nodes that read, directly or not, an output of an ``op_type`` node."""
    tainted: set[str] = set()
    names: list[str] = []
    for node in model.graph.node:  # ONNX graphs are stored in topological order
        if node.op_type == op_type or any(name in tainted for name in node.input):
            tainted.update(node.output)
            if node.op_type != op_type:
                names.append(node.name)
    return names


def _quantize(source: Path, target: Path, images: np.ndarray, per_channel: bool) -> None:
    from onnxruntime import quantization as q

    reader = _CalibrationReader(images)
    # A glimpse head's convolutions come after its GridSample, and the trunk's never do.
    glimpse = downstream_of(onnx.load(str(source)), "GridSample")
    q.quantize_static(
        str(source),
        str(target),
        reader,  # type: ignore[arg-type]
        quant_format=q.QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=q.QuantType.QUInt8,
        weight_type=q.QuantType.QInt8,
        # Convolutions are where the time goes; the small heads (classifier, box MLP, CAM,
        # glimpse) stay in float, which keeps probabilities, boxes and CAMs accurate.
        op_types_to_quantize=["Conv"],
        nodes_to_exclude=glimpse,
        calibrate_method=q.CalibrationMethod.MinMax,
    )


def to_int8(
    path: Path,
    staging: Path,
    spec: ModelSpec,
    loaded: LoadedModel,
    data: Path,
    fp32: dict[str, Any],
    options: Int8Options,
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
        # Typically a network full of ops ONNX Runtime has no integer kernels for (the
        # squeeze-excite blocks of MobileNetV3 and EfficientNet: global pooling, hard
        # sigmoid, multiply), so the QDQ graph converts back and forth around them.
        message = (
            f"INT8 is slower than FP32 for this model on this CPU: {int8_s * 1e3:.2f} ms "
            f"against {fp32_s * 1e3:.2f} ms per batch of 8 on 2 threads ({speedup:.2f}x). "
            "ONNX Runtime lacks integer kernels for some of its operators (e.g. the "
            "squeeze-excite blocks of MobileNetV3/EfficientNet), so the graph converts "
            "between INT8 and float around them"
        )
        if not options.accept_slower:
            raise ExportError(message + " (pass --accept-slower to publish it anyway)")
        log.warning("%s; publishing it as asked (--accept-slower)", message)
    os.replace(candidate, path)
    spec = with_metrics(spec, metrics, prefix="int8_")
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
