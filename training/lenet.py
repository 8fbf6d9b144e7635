"""LeNet-5 (LeCun et al., 1998) as a trunk: the first convolutional network, for small inputs.

The layout is the paper's: C1 5x5 conv (6 maps) → S2 2x2 subsampling → C3 5x5 conv (16) →
S4 subsampling → C5 5x5 conv (120). Two modern substitutions, because they train in a few
epochs from scratch where the originals need many: ReLU for the scaled tanh, and average
pooling without the trainable per-map coefficients. No layer pads, as in the paper, so a
32 px input (the paper's: 28 px digits in a 4 px margin) ends in a 1x1 C5 map, and larger
inputs end in a spatial map, which the shared heads pool (classifier) or flatten (boxes).
F6 and the RBF output layer are replaced by those heads, as every backbone's ImageNet
head is.

``grayscale``: the paper's network sees one luminance channel. Inputs stay RGB (every model
in the repository takes uint8 RGB), and the first layer converts with the ITU-R BT.601
weights, so colour cannot matter to the model.
"""

from __future__ import annotations

import torch
from torch import nn

LENET_CHANNELS = 120  # C5's maps: what the heads see

# ITU-R BT.601 luma, applied to the already-normalised channels (a linear map either way).
_LUMA = (0.299, 0.587, 0.114)


class Luminance(nn.Module):
    """RGB [B, 3, H, W] → one channel [B, 1, H, W], the weighted sum of the three."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: torch.Tensor
        self.register_buffer("weights", torch.tensor(_LUMA).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weights).sum(dim=1, keepdim=True)


class LeNet5(nn.Module):
    """``features``: the five layers up to C5, the shape every "features" trunk has."""

    def __init__(self, grayscale: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [Luminance()] if grayscale else []
        layers += [
            nn.Conv2d(1 if grayscale else 3, 6, kernel_size=5),  # C1
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2),  # S2
            nn.Conv2d(6, 16, kernel_size=5),  # C3
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2),  # S4
            nn.Conv2d(16, LENET_CHANNELS, kernel_size=5),  # C5
            nn.ReLU(inplace=True),
        ]
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # type: ignore[no-any-return]
