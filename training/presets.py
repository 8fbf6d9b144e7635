"""Train and eval transforms, box-aware (torchvision.transforms.v2 + tv_tensors).

The eval transform is the single definition of how an image becomes model input, and its
parameters are exactly the ModelSpec's ``Preprocessing``: the exported model carries them
and ``service.model.preprocess`` reproduces them with the same geometry functions (a test keeps
the two equal on the demo val set).

Train transforms add augmentation on top. For localization every geometric step moves the
box with the image; crops always keep the whole object, because a single-object target
that leaves the frame would teach the box head nonsense.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from service.model.geometry import letterbox_size
from service.model.spec import Interpolation, Preprocessing, ResizeMode

INTERPOLATION = {
    Interpolation.NEAREST: InterpolationMode.NEAREST,
    Interpolation.BILINEAR: InterpolationMode.BILINEAR,
    Interpolation.BICUBIC: InterpolationMode.BICUBIC,
}


class AugmentConfig(BaseModel):
    """Training augmentation. Every knob at its neutral value switches that step off."""

    model_config = ConfigDict(extra="forbid")

    crop_scale: tuple[float, float] = Field(default=(0.25, 1.0), description="area fraction")
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    zoom_out: float = Field(default=0.0, ge=0, le=1, description="probability of zoom-out")
    zoom_out_max: float = Field(default=2.0, ge=1.0)
    hflip: float = Field(default=0.5, ge=0, le=1)
    rotation: float = Field(default=0.0, ge=0, description="max degrees")
    translate: float = Field(default=0.0, ge=0, lt=1, description="max fraction")
    shear: float = Field(default=0.0, ge=0, description="max degrees")
    affine_p: float = Field(default=0.5, ge=0, le=1)
    color_jitter: float = Field(default=0.0, ge=0, le=1, description="brightness etc. strength")
    hue: float = Field(default=0.0, ge=0, le=0.5, description="hue jitter (costly on CPU)")
    trivial_augment: bool = Field(default=False, description="TrivialAugmentWide")
    rand_augment: bool = Field(default=False, description="RandAugment (Cubuk et al.)")
    rand_augment_ops: int = Field(default=2, ge=1, le=14, description="RandAugment: ops per image")
    rand_augment_magnitude: int = Field(default=9, ge=0, le=30, description="RandAugment: 0..30")

    @model_validator(mode="after")
    def _one_auto_augment(self) -> AugmentConfig:
        if self.trivial_augment and self.rand_augment:
            raise ValueError("choose one of trivial_augment and rand_augment")
        return self


class Letterbox(v2.Transform):
    """Scale to fit inside (height, width) with the aspect kept, then pad centred."""

    def __init__(self, height: int, width: int, interpolation: InterpolationMode, fill: int):
        super().__init__()
        self.height, self.width = height, width
        self.interpolation = interpolation
        self.fill = fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        rw, rh = letterbox_size(w, h, self.width, self.height)
        left, top = (self.width - rw) // 2, (self.height - rh) // 2
        return {
            "size": [rh, rw],
            "padding": [left, top, self.width - rw - left, self.height - rh - top],
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = F.resize(inpt, params["size"], interpolation=self.interpolation, antialias=True)
        return F.pad(out, params["padding"], fill=self.fill)


class BoxSafeCrop(v2.Transform):
    """A random crop (area scale, aspect ratio) that always contains the whole box.

    Like RandomResizedCrop without the resize, but the crop window is slid (and grown when
    needed) so the single object stays inside: crops can zoom in on the object, never cut it.
    With ``resize_to`` the crop is also resized (stretched) to that (height, width) in the
    same step, which is what the stretch eval resize would do next, at half the per-sample
    cost of two transforms (this is most of the demo's data time on 2 cores).
    """

    def __init__(
        self,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        *,
        resize_to: tuple[int, int] | None = None,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    ):
        super().__init__()
        self.scale, self.ratio = scale, ratio
        self.resize_to, self.interpolation = resize_to, interpolation

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        boxes = [x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes)]
        bx0, by0, bx1, by1 = (0.0, 0.0, float(w), float(h))
        if boxes:
            xyxy = (
                boxes[0]
                if boxes[0].format is tv_tensors.BoundingBoxFormat.XYXY
                else F.convert_bounding_box_format(boxes[0], new_format="XYXY")
            ).as_subclass(torch.Tensor)
            rows = xyxy.tolist()  # one conversion: per-element tensor ops cost more here
            bx0, by0 = min(r[0] for r in rows), min(r[1] for r in rows)
            bx1, by1 = max(r[2] for r in rows), max(r[3] for r in rows)
        area = w * h * float(torch.empty(1).uniform_(*self.scale))
        log_r = torch.empty(1).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = math.exp(float(log_r))
        cw = min(w, max(math.ceil(bx1 - bx0), round(math.sqrt(area * aspect))))
        ch = min(h, max(math.ceil(by1 - by0), round(math.sqrt(area / aspect))))
        # Left edge range such that [left, left + cw] covers [bx0, bx1] and stays in the image.
        lo_x, hi_x = max(0, math.ceil(bx1) - cw), min(int(bx0), w - cw)
        lo_y, hi_y = max(0, math.ceil(by1) - ch), min(int(by0), h - ch)
        left = int(torch.randint(lo_x, max(lo_x, hi_x) + 1, (1,)))
        top = int(torch.randint(lo_y, max(lo_y, hi_y) + 1, (1,)))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if self.resize_to is None:
            return F.crop(inpt, **params)
        return F.resized_crop(
            inpt, **params, size=list(self.resize_to), interpolation=self.interpolation,
            antialias=True,
        )  # fmt: skip


class PhotometricAutoAugment(v2.Transform):
    """TrivialAugmentWide or RandAugment restricted to colour operations, so boxes stay
    valid: their shears, translations and rotations would move the object off its box."""

    _GEOMETRIC: ClassVar[set[str]] = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}

    def __init__(self, inner: v2.TrivialAugmentWide | v2.RandAugment) -> None:
        super().__init__()
        self.inner = inner
        self.inner._AUGMENTATION_SPACE = {
            k: v for k, v in self.inner._AUGMENTATION_SPACE.items() if k not in self._GEOMETRIC
        }

    def forward(self, *inputs: Any) -> Any:
        image, *rest = inputs if len(inputs) > 1 else (inputs[0],)
        out = self.inner(image)
        return (out, *rest) if rest else out


def auto_augment(aug: AugmentConfig, *, with_boxes: bool) -> v2.Transform | None:
    """The automatic augmentation policy ``aug`` asks for (photometric only with boxes)."""
    policy: v2.TrivialAugmentWide | v2.RandAugment
    if aug.trivial_augment:
        policy = v2.TrivialAugmentWide()
    elif aug.rand_augment:
        policy = v2.RandAugment(num_ops=aug.rand_augment_ops, magnitude=aug.rand_augment_magnitude)
    else:
        return None
    return PhotometricAutoAugment(policy) if with_boxes else policy


def eval_resize(prep: Preprocessing, height: int, width: int) -> list[v2.Transform]:
    """The resize step of the eval transform, as v2 transforms (works on PIL and tensors)."""
    interpolation = INTERPOLATION[prep.interpolation]
    if prep.resize_mode is ResizeMode.CENTER_CROP:
        return [
            v2.Resize(prep.resize_size, interpolation=interpolation, antialias=True),
            v2.CenterCrop((height, width)),
        ]
    if prep.resize_mode is ResizeMode.LETTERBOX:
        return [Letterbox(height, width, interpolation, prep.pad_value)]
    return [v2.Resize((height, width), interpolation=interpolation, antialias=True)]


def eval_transform(prep: Preprocessing, height: int, width: int) -> v2.Compose:
    """PIL image (+ boxes) → uint8 CHW tensor at the input size: what the exported model sees.

    The resize runs on the PIL image, exactly as Pillow does it in the service.
    """
    return v2.Compose([*eval_resize(prep, height, width), v2.ToImage()])


def train_transform(
    prep: Preprocessing, height: int, width: int, aug: AugmentConfig, *, with_boxes: bool
) -> v2.Compose:
    """PIL image (+ boxes) → augmented uint8 CHW tensor at the input size.

    Every step runs on the PIL image (Pillow's C code is 2-3x faster per sample than the
    same ops on uint8 tensors on a CPU); the tensor is made at the very end.
    """
    interpolation = INTERPOLATION[prep.interpolation]
    steps: list[v2.Transform] = []
    if aug.zoom_out > 0:
        steps.append(
            v2.RandomZoomOut(
                fill=prep.pad_value, side_range=(1.0, aug.zoom_out_max), p=aug.zoom_out
            )
        )
    if with_boxes or prep.resize_mode is not ResizeMode.CENTER_CROP:
        # Localization (or a whole-image policy): crop around the object, then the eval
        # resize, so the geometry at train time matches what serving will do.
        if aug.crop_scale != (1.0, 1.0) and prep.resize_mode is ResizeMode.STRETCH:
            steps.append(
                BoxSafeCrop(
                    aug.crop_scale, aug.crop_ratio, resize_to=(height, width),
                    interpolation=interpolation,
                )
            )  # fmt: skip
        else:
            if aug.crop_scale != (1.0, 1.0):
                steps.append(BoxSafeCrop(aug.crop_scale, aug.crop_ratio))
            steps.extend(eval_resize(prep, height, width))
    else:
        steps.append(
            v2.RandomResizedCrop(
                (height, width),
                scale=aug.crop_scale,
                ratio=aug.crop_ratio,
                interpolation=interpolation,
                antialias=True,
            )
        )
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.rotation > 0 or aug.translate > 0 or aug.shear > 0:
        affine = v2.RandomAffine(
            degrees=aug.rotation,
            translate=(aug.translate, aug.translate) if aug.translate > 0 else None,
            shear=aug.shear if aug.shear > 0 else None,
            interpolation=InterpolationMode.BILINEAR,
            fill=prep.pad_value,
        )
        steps.append(v2.RandomApply([affine], p=aug.affine_p))
    if aug.color_jitter > 0 or aug.hue > 0:
        s = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s, hue=aug.hue))
    policy = auto_augment(aug, with_boxes=with_boxes)
    if policy is not None:
        steps.append(policy)
    steps.append(v2.ToImage())
    # Only the affine step can move a box past the edges; crops keep it whole.
    if with_boxes and (aug.rotation > 0 or aug.translate > 0 or aug.shear > 0):
        steps.append(v2.ClampBoundingBoxes())
    return v2.Compose(steps)
