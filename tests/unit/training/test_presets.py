"""Transforms: the eval preset equals serving's resize, and augmentation keeps boxes on
the object."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from service.model.preprocess import resize_to_input
from service.model.spec import Preprocessing, ResizeMode
from training.presets import (
    AugmentConfig,
    BoxSafeCrop,
    eval_resize,
    eval_transform,
    train_transform,
)

MODES = [
    Preprocessing(resize_mode=ResizeMode.CENTER_CROP, resize_size=73),
    Preprocessing(resize_mode=ResizeMode.LETTERBOX, resize_size=64),
    Preprocessing(resize_mode=ResizeMode.STRETCH, resize_size=64),
]


@pytest.mark.parametrize("prep", MODES, ids=lambda p: p.resize_mode.value)
@pytest.mark.parametrize("size", [(200, 120), (120, 200), (64, 64), (31, 47), (1000, 90)])
def test_eval_transform_equals_service_resize(prep: Preprocessing, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    ours = eval_transform(prep, 64, 64)(image).permute(1, 2, 0).numpy()
    served, _ = resize_to_input(image, prep, 64, 64)
    assert ours.shape == served.shape == (64, 64, 3)
    np.testing.assert_array_equal(ours, served)


def _object_image(w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    array = np.full((h, w, 3), 60, np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = 250
    return Image.fromarray(array)


def _bright_bbox(tensor: torch.Tensor) -> tuple[float, float, float, float]:
    mask = tensor.float().mean(dim=0) > 200
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.mark.parametrize("mode", [ResizeMode.STRETCH, ResizeMode.LETTERBOX])
def test_axis_aligned_augmentation_keeps_box_on_object(mode: ResizeMode) -> None:
    """Crops, zoom-out and flips: the box must match the object tightly."""
    prep = Preprocessing(resize_mode=mode, resize_size=96)
    aug = AugmentConfig(crop_scale=(0.1, 1.0), zoom_out=0.5, hflip=0.5)
    transform = train_transform(prep, 96, 96, aug, with_boxes=True)
    source_box = (70, 40, 110, 95)
    image = _object_image(180, 130, source_box)
    for seed in range(40):
        torch.manual_seed(seed)
        boxes = tv_tensors.BoundingBoxes([source_box], format="XYXY", canvas_size=(130, 180))
        out, out_boxes = transform(image, boxes)
        assert out.shape == (3, 96, 96)
        box = tuple(float(v) for v in out_boxes[0])
        assert _iou(box, _bright_bbox(out)) > 0.85, (seed, box, _bright_bbox(out))


def test_rotation_and_shear_keep_the_object_inside_the_box() -> None:
    """Rotated objects get the enclosing box: looser, but the whole object stays inside."""
    prep = Preprocessing(resize_mode=ResizeMode.STRETCH, resize_size=96)
    aug = AugmentConfig(
        crop_scale=(0.5, 1.0), hflip=0.0, rotation=15, shear=8, translate=0.05, affine_p=1.0
    )
    transform = train_transform(prep, 96, 96, aug, with_boxes=True)
    source_box = (50, 50, 100, 90)
    image = _object_image(150, 140, source_box)
    for seed in range(30):
        torch.manual_seed(seed)
        boxes = tv_tensors.BoundingBoxes([source_box], format="XYXY", canvas_size=(140, 150))
        out, out_boxes = transform(image, boxes)
        box = [float(v) for v in out_boxes[0]]
        bright = _bright_bbox(out)
        # the object's pixels (minus interpolation fringe) lie inside the box
        assert bright[0] >= box[0] - 2 and bright[1] >= box[1] - 2
        assert bright[2] <= box[2] + 2 and bright[3] <= box[3] + 2
        assert _iou(tuple(box), bright) > 0.5


def test_classification_train_transform_output() -> None:
    prep = Preprocessing(resize_mode=ResizeMode.CENTER_CROP, resize_size=73)
    transform = train_transform(prep, 64, 64, AugmentConfig(trivial_augment=True), with_boxes=False)
    out = transform(_object_image(100, 80, (10, 10, 30, 30)))
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8


@pytest.mark.parametrize(
    "policy", [{"trivial_augment": True}, {"rand_augment": True, "rand_augment_magnitude": 20}]
)
def test_photometric_auto_augment_never_moves_the_box(policy: dict[str, Any]) -> None:
    prep = Preprocessing(resize_mode=ResizeMode.STRETCH, resize_size=64)
    aug = AugmentConfig(crop_scale=(1.0, 1.0), hflip=0.0, **policy)
    transform = train_transform(prep, 64, 64, aug, with_boxes=True)
    image = _object_image(64, 64, (10, 20, 30, 40))
    for seed in range(20):
        torch.manual_seed(seed)
        boxes = tv_tensors.BoundingBoxes([(10, 20, 30, 40)], format="XYXY", canvas_size=(64, 64))
        _, out_boxes = transform(image, boxes)
        assert [float(v) for v in out_boxes[0]] == [10.0, 20.0, 30.0, 40.0]


def test_rand_augment_changes_pixels_and_is_exclusive_with_trivial_augment() -> None:
    prep = Preprocessing(resize_mode=ResizeMode.CENTER_CROP, resize_size=73)
    still: dict[str, Any] = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "hflip": 0.0}
    aug = AugmentConfig(**still, rand_augment=True, rand_augment_ops=3)
    transform = train_transform(prep, 64, 64, aug, with_boxes=False)
    plain = train_transform(prep, 64, 64, AugmentConfig(**still), with_boxes=False)
    image = _object_image(100, 80, (10, 10, 30, 30))
    torch.manual_seed(0)
    changed = sum(
        not torch.equal(transform(image), plain(image)) for _ in range(10)
    )  # nothing else is random; three ops almost never all draw Identity
    assert changed >= 8
    with pytest.raises(ValueError, match="one of trivial_augment and rand_augment"):
        AugmentConfig(trivial_augment=True, rand_augment=True)


def test_the_fused_crop_and_stretch_equals_the_crop_then_the_resize() -> None:
    prep = Preprocessing(resize_mode=ResizeMode.STRETCH, resize_size=48)
    aug = AugmentConfig(crop_scale=(0.3, 1.0), hflip=0.0)
    fused = train_transform(prep, 48, 48, aug, with_boxes=True)
    assert isinstance(fused.transforms[0], BoxSafeCrop) and fused.transforms[0].resize_to
    two_steps = v2.Compose(
        [BoxSafeCrop(aug.crop_scale, aug.crop_ratio), *eval_resize(prep, 48, 48), v2.ToImage()]
    )
    image = _object_image(150, 110, (40, 30, 90, 80))
    for seed in range(10):
        boxes = tv_tensors.BoundingBoxes([(40, 30, 90, 80)], format="XYXY", canvas_size=(110, 150))
        torch.manual_seed(seed)
        got, got_boxes = fused(image, boxes)
        torch.manual_seed(seed)
        want, want_boxes = two_steps(image, boxes)
        assert torch.equal(got, want)
        assert torch.allclose(got_boxes.float(), want_boxes.float())
        assert float(got_boxes.min()) >= 0 and float(got_boxes.max()) <= 48
