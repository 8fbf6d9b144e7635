"""The runner on a real GPU: each provider starts and agrees with the CPU, IO binding
agrees with ``session.run``, warm-up covers every batch size, fallback is visible.

Marked ``gpu``: skipped where this onnxruntime has no CUDA provider (the CPU-only
build of CI and the dev machine); run them on a GPU machine with onnxruntime-gpu:
``python -m pytest -m gpu``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.model.cuda import gpu_present
from service.model.runner import Runner
from service.model.runner_options import CPU, CUDA, TENSORRT, RunnerOptions

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        CUDA not in ort.get_available_providers(),
        reason="needs onnxruntime-gpu (this onnxruntime has no CUDA provider)",
    ),
    pytest.mark.skipif(not gpu_present(), reason="no NVIDIA GPU on this machine"),
]

# FP32 on the GPU differs from the CPU in summation order (and TF32 convolutions on
# Ampere and later): probabilities within 1e-3, and FP16 within the exporter's 1e-2.
FP32_ATOL = 1e-3
FP16_ATOL = 1e-2


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def _gpu_runner(model: Path, provider: str, **options: object) -> Runner:
    runner = Runner(model, RunnerOptions(providers=[provider, CPU], **options))  # type: ignore[arg-type]
    if runner.active_providers[0] != provider:
        pytest.skip(f"{provider} could not start here: running {runner.active_providers}")
    return runner


@pytest.mark.parametrize(
    ("provider", "fp16", "atol"),
    [(CUDA, "off", FP32_ATOL), (TENSORRT, "off", FP32_ATOL), (TENSORRT, "on", FP16_ATOL)],
)
def test_each_gpu_provider_agrees_with_the_cpu(
    quick_model: dict[str, Path], tmp_path: Path, provider: str, fp16: str, atol: float
) -> None:
    cpu = Runner(quick_model["model"], RunnerOptions(providers=[CPU]))
    gpu = _gpu_runner(
        quick_model["model"], provider, trt_fp16=fp16, trt_engine_cache_dir=tmp_path / "trt"
    )
    assert gpu.on_gpu
    for n in (1, 7, 32):  # inside TensorRT's profile: no engine rebuild between them
        batch = _batch(n, seed=n)
        want, got = cpu.run(batch), gpu.run(batch)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=atol, err_msg=name)


def test_io_binding_on_the_device_matches_session_run(quick_model: dict[str, Path]) -> None:
    bound = _gpu_runner(quick_model["model"], CUDA, io_binding=True)
    plain = _gpu_runner(quick_model["model"], CUDA, io_binding=False)
    batch = _batch(9)
    want, got = plain.run(batch), bound.run(batch)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)


def test_warm_up_runs_every_batch_size_the_batcher_can_form(quick_model: dict[str, Path]) -> None:
    gpu = _gpu_runner(quick_model["model"], CUDA)
    sizes = gpu.warmup_sizes(8, [4])
    assert sizes == list(range(1, 9))
    gpu.warmup(sizes)


def test_the_default_preference_runs_on_the_gpu_and_says_which_provider(
    quick_model: dict[str, Path], tmp_path: Path
) -> None:
    # TensorRT first; without its libraries the CUDA provider takes over, logged, and
    # ListModels reports active_providers as they are here.
    runner = Runner(quick_model["model"], RunnerOptions(trt_engine_cache_dir=tmp_path))
    assert runner.active_providers[0] in (TENSORRT, CUDA)
    assert runner.active_providers[-1] == CPU
    assert runner.run(_batch(2))["probabilities"].shape == (2, 10)
