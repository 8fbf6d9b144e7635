"""Grad-CAM, the trunk's stages and the automatic layer, on small random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.gradcam import MIN_MAP_SIDE, auto_layer, find_layer, grad_cam, peak_point, stages
from training.models import BACKBONES, build_model


def test_at_the_last_stage_grad_cam_is_the_class_activation_map() -> None:
    # GAP + linear: d y_c / d A_k = w_ck / (h w) at every cell, so Grad-CAM = ReLU(CAM)/(h w).
    torch.manual_seed(0)
    model = build_model("resnet18", 5, (96, 96), with_boxes=False).eval()
    x = torch.randn(2, 3, 96, 96)
    last = stages(model)[-1]
    result = grad_cam(model, x, last.module, torch.tensor([1, 3]))
    with torch.no_grad():
        _, _, features = model(x)
        weights = model.classifier.weight[[1, 3]]
        cam = torch.einsum("bc,bchw->bhw", weights, features)
        expected = torch.relu(cam) / (features.shape[2] * features.shape[3])
    assert np.allclose(result.maps, expected.numpy(), rtol=1e-4, atol=1e-6)
    assert result.classes.tolist() == [1, 3]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "alexnet", "lenet5"])
def test_stages_are_named_modules_with_their_output_shapes(name: str) -> None:
    model = build_model(name, 3, (96, 96), with_boxes=False)
    known = stages(model)
    modules = dict(model.named_modules())
    assert len(known) == len(model.trunk.blocks())
    for stage in known:
        assert modules[stage.name] is stage.module
    assert known[-1].channels == BACKBONES[name].feature_channels


def test_grad_cam_works_where_an_in_place_op_follows_the_layer() -> None:
    # ResNet's stem: bn1 is followed by an in-place ReLU, which would corrupt the captured map.
    model = build_model("resnet18", 3, (64, 64), with_boxes=False)
    stem = find_layer(model, "0")
    assert stem.name == "trunk.net.bn1"
    result = grad_cam(model, torch.randn(1, 3, 64, 64), stem.module)
    assert result.maps.shape == (1, 32, 32) and np.isfinite(result.maps).all()


def test_the_automatic_layer_is_the_last_stage_when_its_map_is_fine_enough() -> None:
    at_224 = build_model("resnet18", 3, (224, 224), with_boxes=False)
    assert auto_layer(at_224).name == "trunk.net.layer4"  # 7x7
    at_96 = build_model("mobilenet_v3_small", 3, (96, 96), with_boxes=False)
    chosen = auto_layer(at_96)  # the last stage is 3x3: one resolution step finer
    assert (chosen.height, chosen.width) == (6, 6)
    assert chosen.name == "trunk.net.features.8"  # the deepest 6x6 stage
    assert min(stages(at_96)[-1].height, stages(at_96)[-1].width) < MIN_MAP_SIDE


def test_an_unknown_layer_lists_the_stages() -> None:
    model = build_model("resnet18", 3, (64, 64), with_boxes=False)
    with pytest.raises(ValueError, match=r"no layer 'layer9'; its stages are 0: trunk.net.bn1"):
        find_layer(model, "layer9")
    assert find_layer(model, "trunk.net.layer3.0.conv1").channels == 256


def test_the_peak_is_the_centre_of_the_hottest_cell() -> None:
    cam = np.zeros((3, 4), dtype=np.float32)
    cam[2, 1] = 1.0
    assert peak_point(cam, 96, 128) == (48.0, 80.0)
