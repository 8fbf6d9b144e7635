"""The server's preprocessing equals training's eval transform on the demo val set, for
camera-sized JPEGs too, with either decode mode; and the export's decode gate is what the
ModelSpec says."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.model.image_header import ImageLimits
from service.model.preprocess import load_for_model, preprocess_encoded
from service.model.runner import Runner
from service.model.runner_options import CPU, RunnerOptions
from service.model.spec import DecodeMode
from training.data import load_dataset
from training.decode_gate import measure_decode_gate, with_decode
from training.presets import eval_transform

pytestmark = pytest.mark.slow


def _compare(
    paths: list[Path], payloads: list[bytes], model: Path, decode: DecodeMode | None = None
) -> tuple[float, float]:
    runner = Runner(model, RunnerOptions(providers=[CPU]))
    spec = runner.spec if decode is None else with_decode(runner.spec, decode)
    h, w = spec.input.height, spec.input.width
    transform = eval_transform(spec.preprocessing, h, w)
    ours = np.stack([preprocess_encoded(data, spec, ImageLimits())[0] for data in payloads])
    prep = spec.preprocessing
    theirs = np.stack(
        [transform(load_for_model(str(p), prep, h, w)).permute(1, 2, 0).numpy() for p in paths]
    )
    mean_delta = float(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).mean())
    top_ours = runner.run(ours)["probabilities"].argmax(1)
    top_theirs = runner.run(theirs)["probabilities"].argmax(1)
    return mean_delta, float((top_ours == top_theirs).mean())


def test_demo_val_set(quick_model: dict[str, Path]) -> None:
    samples = load_dataset(quick_model["data"], splits=("val",)).splits["val"].samples
    paths = [s.path for s in samples]
    mean_delta, agreement = _compare(paths, [p.read_bytes() for p in paths], quick_model["model"])
    assert mean_delta <= 1.5
    assert agreement == 1.0


def test_large_jpegs_through_draft_mode(quick_model: dict[str, Path], tmp_path: Path) -> None:
    """Camera-sized JPEGs take the draft-mode shortcut, in evaluation as in serving."""
    samples = load_dataset(quick_model["data"], splits=("val",)).splits["val"].samples[:40]
    paths = []
    for i, sample in enumerate(samples):
        with Image.open(sample.path) as image:
            big = image.convert("RGB").resize(
                (image.width * 6, image.height * 6), Image.Resampling.BICUBIC
            )
        path = tmp_path / f"{i}.jpg"
        big.save(path, quality=92)
        paths.append(path)
    payloads = [p.read_bytes() for p in paths]
    with Image.open(io.BytesIO(payloads[0])) as probe:
        probe.draft("RGB", (128, 128))
        assert probe.size[0] < Image.open(paths[0]).size[0]  # draft really applies
    # Whatever the quick model's gate chose, evaluation and serving decode alike.
    for decode in DecodeMode:
        mean_delta, agreement = _compare(paths, payloads, quick_model["model"], decode)
        assert mean_delta <= 1.5
        assert agreement == 1.0


def test_the_export_recorded_its_decode_gate(quick_model: dict[str, Path]) -> None:
    """The quick model (64 px input, ~140 px JPEGs) really meets reduced-scale decodes; its
    ModelSpec says what the export's gate measured, and the decode follows the verdict."""
    spec = Runner(quick_model["model"], RunnerOptions(providers=[CPU])).spec
    gate = measure_decode_gate(quick_model["model"], quick_model["data"])
    assert gate.images == 300 and gate.drafted > 0
    assert spec.metrics["decode_gate_agreement"] == round(gate.agreement, 4)
    assert spec.metrics["decode_gate_drafted"] == gate.drafted
    assert (spec.preprocessing.decode is DecodeMode.JPEG_DRAFT) == gate.passed
