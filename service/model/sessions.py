"""How ONNX Runtime sessions are made: which execution providers a runner uses, in order,
and the options each is created with (TensorRT's profiles, FP16 and engine cache; CUDA's
arena and algorithm search), graph optimisation levels, and a bare session that reads a
model file's metadata."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from service.model.runner_options import CPU, CUDA, TENSORRT, RunnerOptions
from service.model.spec import FP16_GATE_METRIC, ModelSpec


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def select_providers(wanted: Sequence[str]) -> list[str]:
    """The wanted providers this build offers, in order; CPU is always last resort."""
    available = set(available_providers())
    chosen = [p for p in wanted if p in available]
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def trt_fp16_enabled(mode: str, spec: ModelSpec) -> bool:
    """TensorRT FP16 for this model: forced on or off, or (auto) where its gate passed."""
    if mode in ("on", "off"):
        return mode == "on"
    return spec.metrics.get(FP16_GATE_METRIC, 0.0) >= 1.0


def provider_options(
    provider: str, opts: RunnerOptions, spec: ModelSpec, declared_batch: int | None
) -> dict[str, str]:
    """The options one execution provider is created with (strings, as ORT takes them)."""
    if provider == TENSORRT:
        trt = {
            "device_id": str(opts.device_id),
            "trt_fp16_enable": str(trt_fp16_enabled(opts.trt_fp16, spec)),
        }
        if declared_batch is None:
            # Without a profile TensorRT builds an engine for the first shape it sees and
            # rebuilds (seconds) whenever a batch is larger: one profile covers them all.
            largest = max(1, opts.max_batch_size)
            opt = min(largest, opts.opt_batch_size or largest)
            name, hw = spec.input.name, f"{spec.input.height}x{spec.input.width}x3"
            trt["trt_profile_min_shapes"] = f"{name}:1x{hw}"
            trt["trt_profile_opt_shapes"] = f"{name}:{opt}x{hw}"
            trt["trt_profile_max_shapes"] = f"{name}:{largest}x{hw}"
        if opts.trt_engine_cache_dir is not None:
            opts.trt_engine_cache_dir.mkdir(parents=True, exist_ok=True)
            trt["trt_engine_cache_enable"] = "True"
            trt["trt_engine_cache_path"] = str(opts.trt_engine_cache_dir)
            trt["trt_timing_cache_enable"] = "True"
            trt["trt_timing_cache_path"] = str(opts.trt_engine_cache_dir)
        return trt
    if provider == CUDA:
        return {
            "device_id": str(opts.device_id),
            "cudnn_conv_algo_search": opts.cudnn_conv_algo_search,
            # The default doubles the arena at each growth: every new batch size could
            # then reserve twice what it needs, for the life of the session.
            "arena_extend_strategy": "kSameAsRequested",
        }
    return {}


def ort_version() -> str:
    return str(ort.__version__)


OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def bare_session(path: Path) -> ort.InferenceSession:
    """A CPU session without graph optimisation: cheap, for reading what the file says."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=[CPU])
    except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf types
        raise ValueError(f"cannot load {path} into ONNX Runtime: {exc}") from exc


def read_metadata(path: Path) -> dict[str, str]:
    """The model's metadata_props without building a full session's optimized graph."""
    return dict(bare_session(path).get_modelmeta().custom_metadata_map)
