"""Filter patterns: for a filter, the input image that maximises its mean response.

Gradient ascent on the input (Erhan et al., 2009; the recipe of Chollet's "Deep Learning
with Python", 5.4.2), with the regularisers that keep the result an image rather than
adversarial noise (Olah et al., "Feature Visualization", 2017): a few pixels of random
jitter per step, an L2 penalty on the input, and a light blur every few steps. All filters
of one layer are optimised together, one image each, in one batch.

The input is optimised in the model's normalised space; the result is deprocessed for
viewing (centred, scaled to a 0.15 standard deviation around mid-grey, clipped), which
shows the pattern's structure rather than its absolute colours.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from training.gradcam import Stage, capture
from training.models import ImageModel


def _blur(x: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0], device=x.device)
    kernel = (kernel[:, None] * kernel[None, :]) / 16.0
    weight = kernel.expand(x.shape[1], 1, 3, 3).contiguous()
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, groups=x.shape[1])


def deprocess(x: np.ndarray) -> np.ndarray:
    """A [3, H, W] float pattern → a viewable uint8 [H, W, 3] image."""
    x = x - x.mean()
    x = x / (x.std() + 1e-5) * 0.15 + 0.5
    return (np.clip(x, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def filter_patterns(
    model: ImageModel,
    stage: Stage,
    channels: list[int],
    *,
    steps: int = 60,
    lr: float = 0.05,
    l2: float = 1e-3,
    jitter: int = 2,
    blur_every: int = 8,
    seed: int = 0,
) -> np.ndarray:
    """uint8 [len(channels), H, W, 3]: the pattern that maximises each channel at ``stage``."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    h, w = model.input_size
    x = (0.1 * torch.randn(len(channels), 3, h, w, generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    index = torch.tensor(channels)
    rows = torch.arange(len(channels))
    with torch.enable_grad(), capture(stage.module) as seen:
        for step in range(steps):
            dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator))
            seen.clear()
            model(torch.roll(x, shifts=(dy, dx), dims=(2, 3)))
            response = seen[0][rows, index].mean(dim=(1, 2))
            loss = -response.sum() + l2 * x.pow(2).sum()
            (grad,) = torch.autograd.grad(loss, x)
            optimizer.zero_grad(set_to_none=True)
            x.grad = grad
            optimizer.step()
            if blur_every and (step + 1) % blur_every == 0:
                with torch.no_grad():
                    x.copy_(_blur(x))
    patterns = x.detach().float().cpu().numpy()
    return np.stack([deprocess(p) for p in patterns])
