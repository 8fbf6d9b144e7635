"""The ONNX Runtime runner on a real exported model: providers, instances, checks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from service.model.errors import InferenceError
from service.model.runner import Runner
from service.model.runner_options import CPU, CUDA, TENSORRT, RunnerOptions
from service.model.sessions import read_metadata, select_providers

pytestmark = pytest.mark.slow


def test_unavailable_providers_are_filtered_and_cpu_is_always_last() -> None:
    assert select_providers([TENSORRT, CUDA])[-1] == CPU
    assert select_providers(["NoSuchExecutionProvider"]) == [CPU]


def test_gpu_preference_falls_back_to_cpu_here(quick_model: dict[str, Path]) -> None:
    runner = Runner(quick_model["model"], RunnerOptions())  # default: TensorRT, CUDA, CPU
    assert runner.active_providers[-1] == CPU
    out = runner.run(np.zeros((2, 64, 64, 3), np.uint8))
    assert out["probabilities"].shape == (2, 10)


def test_instances_run_concurrently_and_agree(quick_model: dict[str, Path]) -> None:
    runner = Runner(quick_model["model"], RunnerOptions(instances=3))
    batches = [
        np.random.default_rng(i).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8) for i in range(12)
    ]
    with ThreadPoolExecutor(6) as pool:
        parallel = list(pool.map(runner.run, batches))
    for batch, out in zip(batches, parallel, strict=True):
        np.testing.assert_allclose(
            out["probabilities"], runner.run(batch)["probabilities"], atol=1e-6
        )


def test_wrong_batches_are_refused_with_the_expected_shape(quick_model: dict[str, Path]) -> None:
    runner = Runner(quick_model["model"])
    with pytest.raises(InferenceError, match=r"uint8 \[N, 64, 64, 3\]"):
        runner.run(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(InferenceError):
        runner.run(np.zeros((1, 64, 64, 3), np.float32))


def test_optimized_graph_is_cached(quick_model: dict[str, Path], tmp_path: Path) -> None:
    runner = Runner(
        quick_model["model"], RunnerOptions(providers=[CPU], optimized_model_dir=tmp_path)
    )
    runner.warmup([1, 4])
    assert list(tmp_path.glob("*.onnx"))


def test_io_binding_returns_what_session_run_returns(quick_model: dict[str, Path]) -> None:
    # The GPU path (batch copied in once, outputs bound on the device) run on the CPU
    # device: the same graph by the other route must give the very same numbers.
    plain = Runner(quick_model["model"], RunnerOptions(providers=[CPU], io_binding=False))
    bound = Runner(quick_model["model"], RunnerOptions(providers=[CPU], io_binding=True))
    batch = np.random.default_rng(7).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    expected, got = plain.run(batch), bound.run(batch)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_warm_up_on_the_cpu_covers_the_ends_and_the_preferred_sizes(
    quick_model: dict[str, Path],
) -> None:
    runner = Runner(quick_model["model"], RunnerOptions(providers=[CPU]))
    assert not runner.on_gpu
    assert runner.warmup_sizes(32, [8, 16, 64]) == [1, 8, 16, 32]


def test_a_file_that_is_not_onnx_is_refused_with_its_path(tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not an onnx model")
    # The spec is read first through a bare CPU session (as GPU runners do): it must say
    # what failed, as the full session does, not surface ORT's protobuf error alone.
    with pytest.raises(ValueError, match=rf"cannot load {broken} into ONNX Runtime"):
        read_metadata(broken)
    with pytest.raises(ValueError, match="cannot load"):
        Runner(broken)
