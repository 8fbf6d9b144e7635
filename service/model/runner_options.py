"""What a Runner is asked for — providers, threads, caches — without importing ONNX Runtime,
so the settings (``service.server.config``) and ``python -m service --help`` stay light."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_PROVIDERS = (TENSORRT, CUDA, CPU)
# The providers that run on a GPU (what "a GPU" means for the worker count and warm-up).
GPU_PROVIDERS = frozenset({TENSORRT, CUDA})

__all__ = ["CPU", "CUDA", "DEFAULT_PROVIDERS", "GPU_PROVIDERS", "TENSORRT", "RunnerOptions"]


@dataclass(frozen=True)
class RunnerOptions:
    providers: Sequence[str] = DEFAULT_PROVIDERS
    instances: int = 1
    intra_op_threads: int = 0  # 0: auto (1 for light models on CPU, else the cores)
    cores: int = 0  # this process's share of the cores (0: all it may use)
    inter_op_threads: int = 1
    # ONNX Runtime's workers spin after each run by default; in a server whose other
    # threads (decoding, gRPC) share the cores, that spinning steals their CPU.
    allow_spinning: bool = False
    graph_optimization: str = "all"
    optimized_model_dir: Path | None = None  # cache of the optimized graph (CPU only)
    device_id: int = 0
    # TensorRT FP16: "auto" only for a model whose FP16 accuracy gate passed at export
    # (its ModelSpec says so); "on"/"off" force it.
    trt_fp16: Literal["auto", "on", "off"] = "auto"
    trt_engine_cache_dir: Path | None = None  # engines and timing caches (survive restarts)
    # The batches the batcher can form: TensorRT's optimisation profile (min 1, opt, max)
    # and, on a GPU, every size warm-up runs before the model is served.
    max_batch_size: int = 32
    opt_batch_size: int = 0  # 0: max_batch_size
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "EXHAUSTIVE"
    # Bind inputs and outputs to the device's memory (None: on with a GPU provider). On
    # the CPU it is the same computation by another path; tests compare the two.
    io_binding: bool | None = None
    extra_session_config: dict[str, str] = field(default_factory=dict)
