"""The glimpse head: where its window lands, how training moves it, how its logits join."""

from __future__ import annotations

import pytest
import torch

from training.glimpse import GlimpseHead, glimpse_grid, jitter_boxes
from training.models import build_model


def _ramp(h: int, w: int) -> torch.Tensor:
    """[1, 2, h, w]: channel 0 holds each pixel centre's normalised x, channel 1 its y."""
    xs = (torch.arange(w) + 0.5) / w
    ys = (torch.arange(h) + 0.5) / h
    return torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])[None]


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_the_window_samples_the_box_widened_by_its_margin(margin: float) -> None:
    box = torch.tensor([[0.25, 0.375, 0.75, 0.625]])
    size = 8
    grid = glimpse_grid(box, size, margin)
    window = torch.nn.functional.grid_sample(_ramp(64, 96), grid, align_corners=False)
    x0, y0, x1, y1 = box[0].tolist()
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    steps = (torch.arange(size) + 0.5) / size
    want_x = (x0 - dx) + (x1 - x0 + 2 * dx) * steps
    want_y = (y0 - dy) + (y1 - y0 + 2 * dy) * steps
    # A linear ramp is reproduced exactly by bilinear sampling inside the image.
    torch.testing.assert_close(window[0, 0], want_x[None, :].expand(size, size))
    torch.testing.assert_close(window[0, 1], want_y[:, None].expand(size, size))


def test_the_window_is_zero_outside_the_image() -> None:
    head = GlimpseHead(num_classes=3, size=4)
    crop = head.crop(torch.ones(1, 3, 16, 16), torch.tensor([[1.5, 1.5, 2.0, 2.0]]))
    assert torch.count_nonzero(crop) == 0


def test_training_jitter_scales_with_the_box_and_keeps_missing_boxes_missing() -> None:
    torch.manual_seed(0)
    boxes = torch.tensor([[0.1, 0.1, 0.3, 0.2]]).repeat(20_000, 1)
    moved = jitter_boxes(boxes, scale=0.05)
    spread = (moved - boxes).std(dim=0)
    sides = torch.tensor([0.2, 0.1, 0.2, 0.1])
    torch.testing.assert_close(spread / sides, torch.full((4,), 0.05), rtol=0.05, atol=0)
    assert torch.isnan(jitter_boxes(torch.full((2, 4), float("nan")))).all()


def test_the_logits_are_the_trunk_and_the_glimpse_summed() -> None:
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 5, (64, 64), with_boxes=True, glimpse_size=8)
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model.heads(x)
        assert out.glimpse_logits is not None and out.boxes is not None
        torch.testing.assert_close(out.logits, out.trunk_logits + out.glimpse_logits)
        assert model.glimpse is not None
        torch.testing.assert_close(out.glimpse_logits, model.glimpse(x, out.boxes))
        torch.testing.assert_close(model(x)[0], out.logits)


def test_given_boxes_steer_the_glimpse_and_a_missing_one_falls_back_to_the_prediction() -> None:
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 5, (64, 64), with_boxes=True, glimpse_size=8)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    given = torch.tensor([[0.0, 0.0, 0.5, 0.5], [float("nan")] * 4])
    with torch.no_grad():
        out = model.heads(x, glimpse_boxes=given)
        assert model.glimpse is not None and out.boxes is not None
        want = torch.cat([given[:1], out.boxes[1:]])
        torch.testing.assert_close(out.glimpse_logits, model.glimpse(x, want))


def test_the_glimpse_loss_does_not_reach_the_box_head() -> None:
    model = build_model("mobilenet_v3_small", 5, (64, 64), with_boxes=True, glimpse_size=8)
    out = model.heads(torch.randn(2, 3, 64, 64))
    assert out.glimpse_logits is not None
    out.glimpse_logits.sum().backward()
    assert model.box_head is not None
    assert all(p.grad is None for p in model.box_head.parameters())
    assert model.glimpse is not None
    assert all(p.grad is not None for p in model.glimpse.parameters())


def test_no_glimpse_without_boxes_and_none_by_default() -> None:
    assert build_model("resnet18", 3, (64, 64), with_boxes=False, glimpse_size=8).glimpse is None
    assert build_model("resnet18", 3, (64, 64), with_boxes=True).glimpse is None
