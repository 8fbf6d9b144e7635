"""What the runner asks of each execution provider: TensorRT's profile, caches and FP16
gate, the CUDA arena and algorithm search. Pure functions: no session, no GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.model.runner_options import CPU, CUDA, TENSORRT, RunnerOptions
from service.model.sessions import provider_options, trt_fp16_enabled
from service.model.spec import (
    FP16_GATE_METRIC,
    InputSpec,
    ModelSpec,
    Preprocessing,
    ResizeMode,
    Task,
)
from service.server.config_loading import load_settings


def _spec(**metrics: float) -> ModelSpec:
    return ModelSpec(
        name="demo",
        task=Task.CLASSIFICATION,
        labels=["a", "b"],
        input=InputSpec(name="images", height=96, width=80),
        preprocessing=Preprocessing(resize_mode=ResizeMode.STRETCH, resize_size=96),
        metrics=metrics,
    )


def test_tensorrt_gets_one_profile_from_batch_one_to_the_largest_batch() -> None:
    options = RunnerOptions(max_batch_size=32, opt_batch_size=16)
    trt = provider_options(TENSORRT, options, _spec(), declared_batch=None)
    assert trt["trt_profile_min_shapes"] == "images:1x96x80x3"
    assert trt["trt_profile_opt_shapes"] == "images:16x96x80x3"
    assert trt["trt_profile_max_shapes"] == "images:32x96x80x3"
    # No preferred size: the profile is tuned for the largest batch.
    default = provider_options(TENSORRT, RunnerOptions(max_batch_size=8), _spec(), None)
    assert default["trt_profile_opt_shapes"] == "images:8x96x80x3"


def test_a_graph_with_a_fixed_batch_gets_no_profile() -> None:
    trt = provider_options(TENSORRT, RunnerOptions(), _spec(), declared_batch=4)
    assert not any(key.startswith("trt_profile") for key in trt)


def test_tensorrt_keeps_engines_and_timing_caches_in_the_configured_folder(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "trt"
    trt = provider_options(TENSORRT, RunnerOptions(trt_engine_cache_dir=cache), _spec(), None)
    assert cache.is_dir()
    assert trt["trt_engine_cache_enable"] == trt["trt_timing_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == str(cache)
    bare = provider_options(TENSORRT, RunnerOptions(trt_engine_cache_dir=None), _spec(), None)
    assert "trt_engine_cache_enable" not in bare


@pytest.mark.parametrize(
    ("mode", "metrics", "fp16"),
    [
        ("auto", {}, False),  # an FP32 export: FP16 was never measured
        ("auto", {FP16_GATE_METRIC: 1.0}, True),
        ("auto", {FP16_GATE_METRIC: 0.0}, False),  # published past its gate
        ("on", {}, True),
        ("off", {FP16_GATE_METRIC: 1.0}, False),
    ],
)
def test_tensorrt_runs_fp16_only_where_the_gate_passed_or_it_is_asked(
    mode: str, metrics: dict[str, float], fp16: bool
) -> None:
    spec = _spec(**metrics)
    assert trt_fp16_enabled(mode, spec) is fp16
    options = RunnerOptions(trt_fp16=mode)  # type: ignore[arg-type]
    assert provider_options(TENSORRT, options, spec, None)["trt_fp16_enable"] == str(fp16)


def test_cuda_arena_grows_by_what_is_asked_and_the_search_is_configured() -> None:
    cuda = provider_options(
        CUDA, RunnerOptions(device_id=1, cudnn_conv_algo_search="HEURISTIC"), _spec(), None
    )
    assert cuda == {
        "device_id": "1",
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",
    }
    assert provider_options(CPU, RunnerOptions(), _spec(), None) == {}


def test_settings_hand_the_batch_profile_and_gpu_choices_to_the_runner() -> None:
    settings = load_settings(
        max_batch_size=24, preferred_batch_sizes=[4, 8], trt_fp16="on", device_id=2
    )
    options = settings.runner_options()
    assert (options.max_batch_size, options.opt_batch_size) == (24, 8)
    assert (options.trt_fp16, options.device_id) == ("on", 2)
    assert options.cudnn_conv_algo_search == "EXHAUSTIVE"


@pytest.mark.parametrize(("given", "mode"), [(True, "on"), (False, "off"), ("false", "off")])
def test_earlier_true_false_fp16_settings_still_mean_on_and_off(given: object, mode: str) -> None:
    assert load_settings(trt_fp16=given).trt_fp16 == mode
