"""What each stage of a trunk makes of one image: its feature maps, captured and tiled.

The channels shown are the most active ones on the image (highest mean activation), so a
grid of 32 out of 576 shows what this image excites rather than the first 32 by index.
Each channel is scaled to its own range: the grid shows where a channel fires, not how
strongly compared with its neighbours (the panel title gives the channel's peak).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from training.gradcam import Stage, capture
from training.models import ImageModel
from training.tiles import colourise, save_tiles


def layer_outputs(model: ImageModel, x: torch.Tensor, layers: list[Stage]) -> list[np.ndarray]:
    """Each layer's output [B, C, h, w] for the batch ``x`` (normalised [B, 3, H, W]), from
    one forward pass."""
    model.eval()
    with torch.no_grad(), ExitStack() as stack:
        captured = [stack.enter_context(capture(stage.module)) for stage in layers]
        model(x)
    return [seen[0].float().cpu().numpy() for seen in captured]


def most_active(activation: np.ndarray, count: int) -> list[int]:
    """The ``count`` channels with the highest mean activation, strongest first."""
    means = activation.reshape(activation.shape[0], -1).mean(axis=1)
    return [int(c) for c in np.argsort(-means, kind="stable")[:count]]


def plot_channel_grid(
    activation: np.ndarray, title: str, path: Path, max_channels: int = 32
) -> list[int]:
    """Tile the most active channels of one [C, h, w] activation into a PNG; returns them."""
    channels = most_active(activation, max_channels)
    tiles = [colourise(activation[c]) for c in channels]
    captions = [f"ch {c} ({float(activation[c].max()):.2g})" for c in channels]
    save_tiles(tiles, captions, title, path)
    return channels
