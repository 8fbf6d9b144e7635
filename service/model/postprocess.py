"""Model outputs → answers: top-k labels, boxes in original pixels, CAM boxes and heatmaps.

Boxes come out of the model normalised to the input tensor; ``Geometry`` (from
``service.model.preprocess``) maps them back through the crop, letterbox or stretch onto the
original image. Models without a box head still localize: the top-1 class activation map
is upsampled to the input, thresholded at ``cam_threshold`` of its range, and the largest
connected component's bounding box is the answer (Zhou et al., 2016).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from service.model.errors import InvalidArgumentError
from service.model.geometry import Geometry
from service.model.results import Box, Heatmap, Localization, Prediction
from service.model.spec import ModelSpec

BOX_SOURCE_REGRESSION = "regression"
BOX_SOURCE_CAM = "cam"


def top_k(probabilities: np.ndarray, k: int, labels: list[str]) -> list[Prediction]:
    """The k most probable classes of one image, best first (ties: lower index first)."""
    n = len(probabilities)
    k = max(1, min(k, n))
    if n <= 64:
        # A short row sorts faster in Python than numpy's per-call overhead allows; this is
        # on every answer's path. (Python's sort is stable with reverse=True too.)
        row = probabilities.tolist()
        order = sorted(range(n), key=row.__getitem__, reverse=True)[:k]
        return [Prediction(i, labels[i], row[i]) for i in order]
    part = np.argpartition(-probabilities, k - 1)[:k]
    best = part[np.argsort(-probabilities[part], kind="stable")]
    return [Prediction(int(i), labels[int(i)], float(probabilities[i])) for i in best]


def regression_box(box: np.ndarray, geometry: Geometry, in_h: int, in_w: int, score: float) -> Box:
    """A normalised xyxy box in input-tensor coordinates → original-image pixels."""
    scaled = (
        float(box[0]) * in_w,
        float(box[1]) * in_h,
        float(box[2]) * in_w,
        float(box[3]) * in_h,
    )
    return Box(*geometry.to_original(scaled), score=score)


def _normalise(cam: np.ndarray) -> np.ndarray:
    cam = cam.astype(np.float32, copy=False)
    low, high = float(cam.min()), float(cam.max())
    if high - low <= 1e-12:
        return np.zeros_like(cam)
    return (cam - low) / (high - low)


def cam_box(
    cam: np.ndarray, geometry: Geometry, in_h: int, in_w: int, threshold: float, score: float
) -> Box:
    """One class activation map [h, w] → the box around its largest hot region."""
    h, w = cam.shape
    up = ndimage.zoom(
        _normalise(cam), (in_h / h, in_w / w), order=1, mode="nearest", grid_mode=True
    )
    mask = up >= threshold
    labelled, count = ndimage.label(mask)
    if count == 0:
        return Box(*geometry.to_original((0.0, 0.0, float(in_w), float(in_h))), score=score)
    sizes = ndimage.sum_labels(mask, labelled, index=np.arange(1, count + 1))
    largest = int(np.argmax(sizes)) + 1
    rows, cols = ndimage.find_objects((labelled == largest).astype(np.int32))[0]
    box = (float(cols.start), float(rows.start), float(cols.stop), float(rows.stop))
    return Box(*geometry.to_original(box), score=score)


def locate(
    outputs: dict[str, np.ndarray], geometry: Geometry, spec: ModelSpec, score: float
) -> tuple[Box, str]:
    """One image's box and where it came from: the box head if the model has one, else
    its top-1 CAM. Shared by the server and the scoring engines, so they agree."""
    h, w = spec.input.height, spec.input.width
    if spec.outputs.boxes is not None:
        box = regression_box(outputs[spec.outputs.boxes], geometry, h, w, score)
        return box, BOX_SOURCE_REGRESSION
    cam = outputs[str(spec.outputs.cam)][0]
    return cam_box(cam, geometry, h, w, spec.cam_threshold, score), BOX_SOURCE_CAM


def heatmap(
    cam: np.ndarray, geometry: Geometry, in_h: int, in_w: int, max_side: int = 224
) -> Heatmap:
    """The CAM over the whole original image, at most ``max_side`` on its longer side.

    Each heatmap cell samples the CAM at the point the model saw for that part of the
    original; parts the model never saw (cropped away by center_crop) are 0.
    """
    ow, oh = geometry.original_width, geometry.original_height
    scale = min(1.0, max_side / max(ow, oh))
    hw, hh = max(1, round(ow * scale)), max(1, round(oh * scale))
    # Centres of heatmap cells in original pixels → input pixels → CAM cell coordinates.
    xs = (np.arange(hw) + 0.5) * (ow / hw) * geometry.scale_x + geometry.offset_x
    ys = (np.arange(hh) + 0.5) * (oh / hh) * geometry.scale_y + geometry.offset_y
    ch, cw = cam.shape
    cx = xs * (cw / in_w) - 0.5
    cy = ys * (ch / in_h) - 0.5
    grid_y, grid_x = np.meshgrid(cy, cx, indexing="ij")
    values = ndimage.map_coordinates(_normalise(cam), [grid_y, grid_x], order=1, mode="nearest")
    seen = ((ys >= 0) & (ys <= in_h))[:, None] & ((xs >= 0) & (xs <= in_w))[None, :]
    values = np.where(seen, np.clip(values, 0.0, 1.0), 0.0).astype(np.float32)
    return Heatmap(height=hh, width=hw, values=values)


def check_can_localize(spec: ModelSpec, model: str, include_heatmap: bool) -> None:
    """Refuse, before any work, a localization the model cannot give."""
    if not spec.has_boxes and not spec.has_cam:
        raise InvalidArgumentError(
            f"model {model!r} cannot localize: it has neither a box head nor class activation maps"
        )
    if include_heatmap and not spec.has_cam:
        raise InvalidArgumentError(
            f"model {model!r} exports no class activation maps, so the heatmap is not available"
        )


def localizations(
    spec: ModelSpec,
    rows: Sequence[dict[str, np.ndarray]],
    geometries: Sequence[Geometry],
    k: int,
    include_heatmap: bool,
    heatmap_max_side: int = 224,
) -> list[Localization]:
    """Each image's top-k, box (and heatmap) from its output row; what Localize answers."""
    h, w = spec.input.height, spec.input.width
    out = []
    for row, geometry in zip(rows, geometries, strict=True):
        predictions = top_k(row[spec.outputs.probabilities], k, spec.labels)
        box, source = locate(row, geometry, spec, predictions[0].score)
        hm = (
            heatmap(row[str(spec.outputs.cam)][0], geometry, h, w, heatmap_max_side)
            if include_heatmap
            else None
        )
        out.append(Localization(predictions, box, source, hm))
    return out
