"""Filter patterns: gradient ascent really raises the filter's response."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.filter_patterns import deprocess, filter_patterns
from training.gradcam import capture, stages
from training.models import build_model


def _response(
    model: torch.nn.Module, stage_module: torch.nn.Module, x: torch.Tensor, c: int
) -> float:
    with torch.no_grad(), capture(stage_module) as seen:
        model(x)
    return float(seen[0][0, c].mean())


@pytest.mark.slow  # optimizes an image for a few hundred steps
def test_the_pattern_excites_its_filter_more_than_noise_does() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 3, (64, 64), with_boxes=False).eval()
    stage = stages(model)[2]  # layer2
    channels = [0, 5, 9]
    patterns = filter_patterns(model, stage, channels, steps=40)
    assert patterns.shape == (3, 64, 64, 3) and patterns.dtype == np.uint8
    noise = 0.1 * torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for pattern, channel in zip(patterns, channels, strict=True):
        # Undo the viewing transform's scale: compare inputs of the same spread.
        x = torch.from_numpy(pattern.astype(np.float32) / 255.0 - 0.5).permute(2, 0, 1)[None]
        x = x / x.std() * noise.std()
        assert _response(model, stage.module, x, channel) > _response(
            model, stage.module, noise, channel
        )


def test_deprocess_centres_and_clips_to_bytes() -> None:
    image = deprocess(np.random.default_rng(0).normal(3.0, 10.0, (3, 8, 8)).astype(np.float32))
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert 100 < image.mean() < 155
