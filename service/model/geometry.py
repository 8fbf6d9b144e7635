"""Where an image lands in the model's input: the resize, crop or letterbox a ModelSpec asks
for, as a Geometry that maps boxes and heatmaps back onto the original pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.model.spec import Preprocessing, ResizeMode


@dataclass(frozen=True)
class Geometry:
    """How one original image maps onto the model input.

    An original pixel coordinate x maps to ``x * scale_x + offset_x`` in the input tensor
    (same for y). ``resized`` is the size after the resize step, before crop or pad.
    """

    original_width: int
    original_height: int
    resized_width: int
    resized_height: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    def to_original(
        self, box: tuple[float, float, float, float]
    ) -> tuple[float, float, float, float]:
        """Input-pixel xyxy → original-pixel xyxy, clipped to the original image."""
        x0, y0, x1, y1 = box
        ox = [(x - self.offset_x) / self.scale_x for x in (x0, x1)]
        oy = [(y - self.offset_y) / self.scale_y for y in (y0, y1)]
        w, h = self.original_width, self.original_height
        return (
            float(np.clip(ox[0], 0, w)),
            float(np.clip(oy[0], 0, h)),
            float(np.clip(ox[1], 0, w)),
            float(np.clip(oy[1], 0, h)),
        )


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(int): shorter side to ``size``, longer side truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def letterbox_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    scale = min(target_w / width, target_h / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def center_offset(size: int, target: int) -> int:
    # Same expression as torchvision's center_crop, so both sides crop the same pixels.
    return round((size - target) / 2.0)


def plan_geometry(width: int, height: int, prep: Preprocessing, in_h: int, in_w: int) -> Geometry:
    if prep.resize_mode is ResizeMode.CENTER_CROP:
        rw, rh = shorter_side_size(width, height, prep.resize_size)
        left, top = center_offset(rw, in_w), center_offset(rh, in_h)
        return Geometry(width, height, rw, rh, rw / width, rh / height, -left, -top)
    if prep.resize_mode is ResizeMode.LETTERBOX:
        rw, rh = letterbox_size(width, height, in_w, in_h)
        left, top = (in_w - rw) // 2, (in_h - rh) // 2
        return Geometry(width, height, rw, rh, rw / width, rh / height, left, top)
    return Geometry(width, height, in_w, in_h, in_w / width, in_h / height, 0.0, 0.0)
