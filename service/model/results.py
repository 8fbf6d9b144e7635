"""Plain result types shared by the server's postprocessing and the client SDK."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Box:
    """A box in pixels of the original image (after EXIF orientation)."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float
    score: float = 0.0

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x_min, self.y_min, self.x_max, self.y_max)


@dataclass(frozen=True)
class Heatmap:
    height: int
    width: int
    values: np.ndarray  # float32 [height, width] in [0, 1], over the whole original image


@dataclass(frozen=True)
class Classification:
    predictions: list[Prediction]
    # The model and version that answered (filled by the SDK; empty in-process).
    model: str = ""
    version: str = ""

    @property
    def top(self) -> Prediction:
        return self.predictions[0]


@dataclass(frozen=True)
class Localization:
    predictions: list[Prediction]
    box: Box
    box_source: str  # "regression" or "cam"
    heatmap: Heatmap | None = field(default=None)
    model: str = ""
    version: str = ""

    @property
    def top(self) -> Prediction:
        return self.predictions[0]
