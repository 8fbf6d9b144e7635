"""Grad-CAM (Selvaraju et al., 2017) for every backbone in the registry, and the trunk's
named stages it (and the activation views) can be taken at.

Grad-CAM weighs a layer's channels by the mean gradient of a class score over each channel
and keeps the positive part: ``ReLU(Σ_k mean(∂y_c/∂A_k) · A_k)``. At the trunk's last stage
this equals the exported CAM up to scale (the classifier is GAP + linear, so the gradient of
``y_c`` over ``A_k`` is ``w_ck / (h·w)`` everywhere); its use is at earlier, finer stages,
where CAM does not exist. So the automatic layer is the last stage only when its map is
fine enough to point at something (``MIN_MAP_SIDE`` cells on its short side, as 7x7 at
224 px); otherwise (small inputs) it is the deepest stage one resolution step finer.
Measured on the demo model (96 px, mobilenet_v3_small, 300 val images), Grad-CAM's peak
inside the true box / its box's loc accuracy: last stage (3x3) 0.75 / 0.18; the deepest
6x6 stage 0.88 / 0.44; the deepest 12x12 stage 0.76 / 0.27 (too early to know digits).

Everything here works on normalised float input in input-tensor coordinates; the callers
map results to original pixels with the serving geometry (``service.model.preprocess``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from service.model.geometry import Geometry
from service.model.postprocess import cam_box
from training.checkpoint import LoadedModel
from training.data import ImageDataset, collate_skipping_failures, eval_decoder, load_dataset
from training.metrics import compute_metrics
from training.models import ImageModel, InputNormalize
from training.presets import eval_transform

# The short side, in cells, a Grad-CAM map needs to localize: ResNet's last stage at
# 224 px, the resolution Grad-CAM was published at.
MIN_MAP_SIDE = 7


@dataclass(frozen=True)
class Stage:
    """One stage of a trunk: its index, module name (``--layer``) and output shape."""

    index: int
    name: str
    module: nn.Module
    channels: int
    height: int
    width: int


def stages(model: ImageModel) -> list[Stage]:
    """The trunk's stages (``Trunk.blocks``), each named by the module whose output ends it,
    with its output shape at the model's input size."""
    names = {id(module): name for name, module in model.named_modules()}
    modules = [
        block[-1] if isinstance(block, nn.ModuleList) else block for block in model.trunk.blocks()
    ]
    shapes: dict[int, torch.Size] = {}
    handles = [
        m.register_forward_hook(lambda mod, _i, out: shapes.__setitem__(id(mod), out.shape))
        for m in modules
    ]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *model.input_size))
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return [
        Stage(
            i, names[id(m)], m, int(shapes[id(m)][1]), int(shapes[id(m)][2]), int(shapes[id(m)][3])
        )
        for i, m in enumerate(modules)
        if id(m) in shapes and len(shapes[id(m)]) == 4
    ]


def find_layer(model: ImageModel, name: str) -> Stage:
    """A module by its name in ``model.named_modules()``, or a stage by its index."""
    known = stages(model)
    for stage in known:
        if name in (stage.name, str(stage.index)):
            return stage
    modules = dict(model.named_modules())
    if name not in modules:
        listed = ", ".join(f"{s.index}: {s.name}" for s in known)
        raise ValueError(f"{model.info.name} has no layer {name!r}; its stages are {listed}")
    with capture(modules[name]) as seen, torch.no_grad():
        was_training = model.training
        model.eval()
        model(torch.zeros(1, 3, *model.input_size))
        model.train(was_training)
    shape = seen[0].shape
    if len(shape) != 4:
        raise ValueError(f"layer {name!r} gives a {list(shape)} tensor, not a feature map")
    return Stage(-1, name, modules[name], int(shape[1]), int(shape[2]), int(shape[3]))


def auto_layer(model: ImageModel) -> Stage:
    """The last stage; if its map is under ``MIN_MAP_SIDE`` cells on its short side, the
    deepest stage with a finer map (one downsampling earlier), when there is one."""
    known = stages(model)
    last = known[-1]
    if min(last.height, last.width) >= MIN_MAP_SIDE:
        return last
    finer = [s for s in known if s.height > last.height and s.width > last.width]
    return finer[-1] if finer else last


@contextmanager
def capture(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect ``module``'s outputs while inside. The network goes on with a copy, so an
    in-place op after the module (ResNet's stem ReLU) cannot change what was captured,
    which autograd needs intact."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        seen.append(output)
        return output.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@dataclass
class GradCamResult:
    maps: np.ndarray  # [B, h, w] float32, >= 0, at the layer's resolution
    classes: np.ndarray  # [B] the class each map explains
    probabilities: np.ndarray  # [B, K]
    boxes: np.ndarray | None  # [B, 4] the box head's normalised xyxy, if any


def grad_cam(
    model: ImageModel, x: torch.Tensor, layer: nn.Module, classes: torch.Tensor | None = None
) -> GradCamResult:
    """Grad-CAM maps of ``classes`` (default: each image's top-1) at ``layer``.

    ``x``: normalised float [B, 3, H, W]. The model stays in eval mode (BatchNorm uses its
    running statistics, dropout is off): the maps explain the model that is served.
    """
    model.eval()
    with torch.enable_grad(), capture(layer) as seen:
        logits, boxes, _ = model(x.detach().requires_grad_(True))
        activation = seen[0]
        chosen = logits.argmax(dim=1) if classes is None else classes.to(logits.device)
        score = logits.gather(1, chosen.view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(score, activation)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    maps = torch.relu((weights * activation.detach()).sum(dim=1))
    return GradCamResult(
        maps=maps.float().cpu().numpy(),
        classes=chosen.cpu().numpy(),
        probabilities=torch.softmax(logits.detach().float(), dim=1).cpu().numpy(),
        boxes=None if boxes is None else boxes.detach().float().cpu().numpy(),
    )


def peak_point(cam: np.ndarray, in_h: int, in_w: int) -> tuple[float, float]:
    """The centre of the map's hottest cell, in input-tensor pixels (x, y)."""
    h, w = cam.shape
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return (col + 0.5) * in_w / w, (row + 0.5) * in_h / h


def gradcam_localization(
    loaded: LoadedModel, data: Path, *, split: str = "val", threshold: float = 0.2, batch: int = 64
) -> dict[str, float] | None:
    """Loc accuracy and mean IoU of the box around each val image's top-1 Grad-CAM (at
    ``auto_layer``), found exactly as serving finds a CAM's box (``cam_box``: the largest
    region above ``threshold`` of the map's range). None when the data has no boxes."""
    h, w = loaded.input_size
    index = load_dataset(
        data, splits=(split,), classes=loaded.classes, manifest=loaded.config.manifest
    )
    if not index.with_boxes:
        return None
    dataset = ImageDataset(
        index.splits[split].samples,
        eval_transform(loaded.preprocessing, h, w),
        with_boxes=True,
        decode=eval_decoder(loaded.preprocessing, h, w),
    )
    loader = DataLoader(dataset, batch_size=batch, collate_fn=collate_skipping_failures)
    normalize = InputNormalize(loaded.preprocessing.mean, loaded.preprocessing.std)
    layer = auto_layer(loaded.model)
    # Input pixels are the frame here: the boxes are compared normalised, as in training.
    identity = Geometry(w, h, w, h, 1.0, 1.0, 0.0, 0.0)
    probs, labels, pred_boxes, true_boxes = [], [], [], []
    for item in loader:
        if item is None:
            continue
        images, y, boxes = item
        result = grad_cam(loaded.model, normalize(images), layer.module)
        probs.append(result.probabilities)
        labels.append(y.numpy())
        true_boxes.append(boxes.numpy())
        for cam in result.maps:
            box = cam_box(cam, identity, h, w, threshold, 1.0)
            pred_boxes.append([box.x_min / w, box.y_min / h, box.x_max / w, box.y_max / h])
    metrics = compute_metrics(
        np.concatenate(probs),
        np.concatenate(labels),
        loaded.classes,
        np.array(pred_boxes),
        np.concatenate(true_boxes),
    )
    return {"loc_acc": float(metrics["loc_acc"]), "mean_iou": float(metrics["mean_iou"])}
