"""Backbone registry, heads, freezing and weight loading."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from training.models import (
    BACKBONES,
    PretrainedWeightsError,
    build_model,
    load_backbone_weights,
)

# Full-size trunks take half a second to a few seconds each to build and run on
# 2 cores; they run in `make test` (slow tier) so `make test-fast` stays in seconds.
HEAVY_BACKBONES = {
    "alexnet",
    "densenet121",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "inception_v3",
    "resnet34",
    "resnet50",
    "vgg16_bn",
}


def heavy_ones_slow(names: list[str]) -> list[Any]:
    """Parameters for `names`, the heavy backbones marked slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY_BACKBONES else n for n in names]


@pytest.mark.parametrize("name", heavy_ones_slow(list(BACKBONES)))
def test_every_backbone_builds_with_heads_and_runs(name: str) -> None:
    size = max(64, BACKBONES[name].min_input)
    model = build_model(name, num_classes=7, input_size=(size, size), with_boxes=True)
    model.eval()
    with torch.no_grad():
        logits, boxes, features = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 7)
    assert boxes is not None and boxes.shape == (2, 4)
    assert bool(((boxes >= 0) & (boxes <= 1)).all())
    assert bool((boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all())
    assert features.shape[:2] == (2, BACKBONES[name].feature_channels)


def test_unknown_backbone_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="choose one of: resnet18, resnet34"):
        build_model("resnet19", 3, (64, 64), with_boxes=False)


def test_classifier_only_model_has_no_box_head() -> None:
    model = build_model("resnet18", 3, (64, 64), with_boxes=False)
    assert model.box_head is None
    assert model(torch.randn(1, 3, 64, 64))[1] is None


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_stage_one_freezing_really_freezes() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 4, (64, 64), with_boxes=True)
    model.freeze_backbone(0)
    model.train()
    trunk_before, head_before = _snapshot(model.trunk), _snapshot(model.classifier)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    logits, boxes, _ = model(torch.randn(8, 3, 64, 64))
    assert boxes is not None
    (torch.nn.functional.cross_entropy(logits, torch.arange(8) % 4) + boxes.sum()).backward()
    optimizer.step()
    assert all(not p.requires_grad for p in model.trunk.parameters())
    for key, value in _snapshot(model.trunk).items():  # weights AND BatchNorm running stats
        assert torch.equal(value, trunk_before[key]), key
    assert not torch.equal(model.classifier.weight, head_before["weight"])
    assert all(not m.training for m in model.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_stage_two_unfreezes_top_blocks_only() -> None:
    model = build_model("mobilenet_v3_small", 4, (64, 64), with_boxes=False)
    model.freeze_backbone(3)
    model.train()
    blocks = model.trunk.blocks()
    for block in blocks[:-3]:
        assert all(not p.requires_grad for p in block.parameters())
        assert all(not m.training for m in block.modules())
    for block in blocks[-3:]:
        assert all(p.requires_grad for p in block.parameters())
    model.freeze_backbone(None)
    assert all(p.requires_grad for p in model.trunk.parameters())


def test_weights_file_in_torchvision_format_loads_trunk_and_leaves_heads(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 5, (64, 64), with_boxes=True, weights_file=path)
    net: Any = model.trunk.net
    assert torch.equal(net.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert model.classifier.weight.shape == (5, 512)


def test_weights_file_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    model = build_model("resnet18", 5, (64, 64), with_boxes=False)
    with pytest.raises(ValueError, match="is it a resnet18 state_dict"):
        load_backbone_weights(model, path)


def test_pretrained_offline_without_cache_names_the_alternatives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real failed download: an empty weight cache and a proxy nobody listens on.
    # urllib keeps the first opener it builds, proxies included: the one built here must
    # not outlive the test (a later urlopen in this process would go to the dead proxy).
    monkeypatch.setattr(urllib.request, "_opener", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(PretrainedWeightsError) as info:
        build_model("resnet18", 3, (64, 64), with_boxes=False, pretrained=True)
    message = str(info.value)
    assert "--weights-file" in message and "--no-pretrained" in message
    assert os.fspath(tmp_path) in message


def test_a_checkpoint_is_restored_into_the_model_its_run_built() -> None:
    """A run fine-tuned from torchvision's GoogLeNet weights re-normalises its input
    (``transform_input``) and keeps torchvision's BatchNorm momentum; evaluate, export and
    resume rebuild that, without fetching the weights. A from-scratch run is rebuilt with
    its own settings (momentum 0.1)."""

    def momenta(model: torch.nn.Module) -> set[float | None]:
        return {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}

    fine_tuned = build_model(
        "googlenet", 3, (64, 64), with_boxes=False, pretrained=True, restoring=True
    )
    assert fine_tuned.trunk.net.transform_input is True
    scratch = build_model("googlenet", 3, (64, 64), with_boxes=False, pretrained=False)
    assert scratch.trunk.net.transform_input is False
    # The same parameters either way, so either checkpoint loads into its rebuild.
    assert fine_tuned.state_dict().keys() == scratch.state_dict().keys()
    x = torch.randn(1, 3, 64, 64)
    fine_tuned.load_state_dict(scratch.state_dict())
    fine_tuned.eval(), scratch.eval()
    # Same weights, different features: the input transform is part of the model.
    assert not torch.allclose(fine_tuned.trunk(x), scratch.trunk(x), rtol=1e-3, atol=0.0)

    resumed = build_model(
        "mobilenet_v3_small", 3, (64, 64), with_boxes=False, pretrained=True, restoring=True
    )
    assert momenta(resumed) == {0.01}  # torchvision's, as the fine-tuning run had
    from_scratch = build_model(
        "mobilenet_v3_small", 3, (64, 64), with_boxes=False, pretrained=False, restoring=True
    )
    assert momenta(from_scratch) == {0.1}


@pytest.mark.parametrize(
    "name", heavy_ones_slow([n for n, info in BACKBONES.items() if info.min_input > 32])
)
def test_the_minimum_input_size_is_the_smallest_that_builds(name: str) -> None:
    smallest = BACKBONES[name].min_input
    build_model(name, 3, (smallest, smallest), with_boxes=True)
    with pytest.raises(RuntimeError):
        build_model(name, 3, (smallest - 1, smallest - 1), with_boxes=True)


@pytest.mark.slow
def test_inception_aux_logits_exist_in_training_only() -> None:
    model = build_model("inception_v3", 5, (96, 96), with_boxes=False)
    x = torch.randn(2, 3, 96, 96)
    model.train()
    aux = model.heads(x).aux_logits
    assert aux is not None and aux.shape == (2, 5)
    model.eval()
    with torch.no_grad():
        assert model.heads(x).aux_logits is None
        assert len(model(x)) == 3


def test_grayscale_lenet_sees_only_luminance() -> None:
    model = build_model("lenet5_gray", 4, (32, 32), with_boxes=False).eval()
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 1.0
    # The same BT.601 luma from a mix of green and blue: the model cannot tell them apart.
    other = torch.zeros(1, 3, 32, 32)
    other[:, 1] = 0.299 / 0.587
    with torch.no_grad():
        assert torch.allclose(model(red)[0], model(other)[0], atol=1e-5)
        rgb = build_model("lenet5", 4, (32, 32), with_boxes=False).eval()
        assert not torch.allclose(rgb(red)[0], rgb(other)[0], atol=1e-5)


def test_lenet_stages_end_at_its_subsampling_layers() -> None:
    model = build_model("lenet5", 4, (32, 32), with_boxes=False)
    stages = model.trunk.blocks()
    assert len(stages) == 3
    assert model(torch.randn(1, 3, 32, 32))[2].shape == (1, 120, 1, 1)


def test_backbones_without_torchvision_weights_say_how_to_train_them() -> None:
    with pytest.raises(PretrainedWeightsError, match="--no-pretrained"):
        build_model("lenet5", 3, (32, 32), with_boxes=False, pretrained=True)


def test_the_config_refuses_inputs_a_backbone_cannot_take() -> None:
    from pydantic import ValidationError

    from training.config import TrainConfig

    with pytest.raises(ValidationError, match="inception_v3 needs input_size >= 75"):
        TrainConfig(data=Path("d"), backbone="inception_v3", input_size=64, pretrained=False)
    with pytest.raises(ValidationError, match="lenet5 has no pretrained weights"):
        TrainConfig(data=Path("d"), backbone="lenet5")
