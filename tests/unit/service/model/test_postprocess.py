"""Top-k, boxes back to original pixels, CAM boxes and heatmaps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.model.geometry import plan_geometry
from service.model.postprocess import (
    BOX_SOURCE_CAM,
    BOX_SOURCE_REGRESSION,
    cam_box,
    heatmap,
    locate,
    regression_box,
    top_k,
)
from service.model.spec import InputSpec, ModelSpec, OutputSpec, Preprocessing, ResizeMode, Task


def test_top_k_is_sorted_and_labelled() -> None:
    probs = np.array([0.1, 0.5, 0.05, 0.35])
    got = top_k(probs, 3, ["a", "b", "c", "d"])
    assert [(p.index, p.label) for p in got] == [(1, "b"), (3, "d"), (0, "a")]
    assert got[0].score == pytest.approx(0.5)
    assert len(top_k(probs, 10, list("abcd"))) == 4


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]), min_size=1, max_size=200),
    st.integers(1, 10),
)
def test_top_k_matches_a_stable_argsort_with_ties_and_long_rows(row: list[float], k: int) -> None:
    """Short rows take a pure-Python path, long ones numpy's: both are a stable sort."""
    probs = np.array(row, dtype=np.float32)
    labels = [f"c{i}" for i in range(len(row))]
    expected = np.argsort(-probs, kind="stable")[:k].tolist()
    got = top_k(probs, k, labels)
    assert [p.index for p in got] == expected
    assert [p.label for p in got] == [labels[i] for i in expected]
    assert all(isinstance(p.index, int) and isinstance(p.score, float) for p in got)


def test_regression_box_undoes_letterbox() -> None:
    prep = Preprocessing(resize_mode=ResizeMode.LETTERBOX, resize_size=100)
    geometry = plan_geometry(400, 200, prep, 100, 100)  # scaled 1/4, padded 25 px top/bottom
    box = regression_box(np.array([0.25, 0.25, 0.5, 0.75]), geometry, 100, 100, 0.9)
    assert box.as_tuple() == pytest.approx((100.0, 0.0, 200.0, 200.0))
    assert box.score == pytest.approx(0.9)


def test_regression_box_undoes_center_crop() -> None:
    prep = Preprocessing(resize_mode=ResizeMode.CENTER_CROP, resize_size=100)
    geometry = plan_geometry(200, 100, prep, 100, 100)  # 200x100 → 200x100, crop x 50..150
    box = regression_box(np.array([0.0, 0.0, 1.0, 1.0]), geometry, 100, 100, 1.0)
    assert box.as_tuple() == pytest.approx((50.0, 0.0, 150.0, 100.0))


def test_cam_box_surrounds_the_hot_region() -> None:
    cam = np.zeros((8, 8), np.float32)
    cam[2:4, 4:7] = 5.0  # hot cells
    cam[7, 0] = 1.0  # a weak spot below threshold
    prep = Preprocessing(resize_mode=ResizeMode.STRETCH, resize_size=64)
    geometry = plan_geometry(128, 64, prep, 64, 64)  # x scaled by 1/2, y by 1
    box = cam_box(cam, geometry, 64, 64, threshold=0.5, score=0.7)
    # Cells 4..7 of 8 in x → input x 32..56 → original 64..112; cells 2..4 in y → 16..32.
    assert box.x_min == pytest.approx(64, abs=8) and box.x_max == pytest.approx(112, abs=8)
    assert box.y_min == pytest.approx(16, abs=4) and box.y_max == pytest.approx(32, abs=4)


def test_flat_cam_gives_the_whole_image() -> None:
    prep = Preprocessing(resize_mode=ResizeMode.STRETCH, resize_size=32)
    geometry = plan_geometry(50, 40, prep, 32, 32)
    box = cam_box(np.zeros((4, 4)), geometry, 32, 32, 0.2, 0.0)
    assert box.as_tuple() == pytest.approx((0.0, 0.0, 50.0, 40.0))


def test_heatmap_covers_the_original_at_bounded_resolution() -> None:
    cam = np.zeros((4, 4), np.float32)
    cam[0, 3] = 1.0  # top-right hot
    prep = Preprocessing(resize_mode=ResizeMode.STRETCH, resize_size=32)
    geometry = plan_geometry(1000, 500, prep, 32, 32)
    hm = heatmap(cam, geometry, 32, 32, max_side=100)
    assert (hm.width, hm.height) == (100, 50)
    assert hm.values.shape == (50, 100)
    assert float(hm.values.min()) >= 0.0 and float(hm.values.max()) <= 1.0
    y, x = np.unravel_index(int(hm.values.argmax()), hm.values.shape)
    assert x > 75 and y < 13


def test_heatmap_is_zero_where_the_model_saw_nothing() -> None:
    prep = Preprocessing(resize_mode=ResizeMode.CENTER_CROP, resize_size=32)
    geometry = plan_geometry(64, 32, prep, 32, 32)  # the crop keeps x 16..48 only
    hm = heatmap(np.ones((4, 4)) + np.eye(4), geometry, 32, 32, max_side=64)
    assert float(hm.values[:, :10].max()) == 0.0 and float(hm.values[:, 54:].max()) == 0.0
    assert float(hm.values[:, 20:44].max()) > 0.0


def _spec(outputs: OutputSpec) -> ModelSpec:
    return ModelSpec(
        name="t",
        task=Task.LOCALIZATION,
        labels=["a", "b"],
        input=InputSpec(height=32, width=32),
        preprocessing=Preprocessing(resize_mode=ResizeMode.STRETCH, resize_size=32),
        outputs=outputs,
        cam_threshold=0.5,
    )


def test_locate_prefers_the_box_head_over_the_cam() -> None:
    spec = _spec(OutputSpec(boxes="boxes", cam="cam"))
    geometry = plan_geometry(64, 32, spec.preprocessing, 32, 32)  # x scaled by 1/2
    cam = np.zeros((1, 4, 4), np.float32)
    cam[0, 0, 0] = 1.0  # the CAM points elsewhere: it must not be used
    outputs = {"boxes": np.array([0.5, 0.25, 1.0, 0.75]), "cam": cam}
    box, source = locate(outputs, geometry, spec, 0.8)
    assert source == BOX_SOURCE_REGRESSION
    assert box.as_tuple() == pytest.approx((32.0, 8.0, 64.0, 24.0))
    assert box.score == pytest.approx(0.8)


def test_locate_falls_back_to_the_top1_cam() -> None:
    spec = _spec(OutputSpec(cam="cam"))
    geometry = plan_geometry(32, 32, spec.preprocessing, 32, 32)
    cam = np.zeros((2, 4, 4), np.float32)
    cam[0, 3, 3] = 1.0  # top-1's CAM: bottom-right cell
    cam[1, 0, 0] = 1.0  # the runner-up's CAM is ignored
    box, source = locate({"cam": cam}, geometry, spec, 0.6)
    assert source == BOX_SOURCE_CAM
    assert box.x_min >= 16 and box.y_min >= 16 and box.x_max == pytest.approx(32, abs=1)
