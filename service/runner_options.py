"""What a Runner is asked for — providers, threads, caches — without importing ONNX Runtime,
so the settings (``service.config``) and ``python -m service --help`` stay light."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_PROVIDERS = (TENSORRT, CUDA, CPU)

__all__ = ["CPU", "CUDA", "DEFAULT_PROVIDERS", "TENSORRT", "RunnerOptions"]


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
    trt_fp16: bool = True
    trt_engine_cache_dir: Path | None = None
    extra_session_config: dict[str, str] = field(default_factory=dict)
