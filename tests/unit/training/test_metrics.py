"""Training's metric values on a case small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import box_iou, compute_metrics, summary, top_k_accuracy

# Six samples, three classes. Truth: 0 0 1 1 2 2; argmax of the scores: 0 1 1 1 0 2.
SCORES = np.array(
    [
        [0.8, 0.1, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.7, 0.2],
        [0.2, 0.5, 0.3],
        [0.5, 0.4, 0.1],
        [0.1, 0.2, 0.7],
    ]
)
LABELS = np.array([0, 0, 1, 1, 2, 2])


def test_confusion_matrix_precision_recall_and_f1() -> None:
    m = compute_metrics(SCORES, LABELS, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # rows: truth
    assert m["top1"] == pytest.approx(4 / 6)
    rows = {r["class"]: r for r in m["per_class"]}
    # a: predicted twice (samples 0 and 4), right once; truly a twice, found once.
    assert (rows["a"]["precision"], rows["a"]["recall"], rows["a"]["f1"]) == (0.5, 0.5, 0.5)
    # b: predicted three times, right twice; both true b found.
    assert rows["b"]["precision"] == pytest.approx(0.6667, abs=1e-4)
    assert rows["b"]["recall"] == 1.0 and rows["b"]["f1"] == pytest.approx(0.8)
    # c: predicted once and right; one of two found.
    assert (rows["c"]["precision"], rows["c"]["recall"]) == (1.0, 0.5)
    assert [r["support"] for r in m["per_class"]] == [2, 2, 2]


def test_a_class_never_predicted_has_zero_precision_not_a_division_error() -> None:
    m = compute_metrics(np.array([[0.9, 0.1], [0.8, 0.2]]), np.array([0, 1]), ["a", "b"])
    b = m["per_class"][1]
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == (0.0, 0.0, 0.0, 1)


def test_top_k_counts_the_label_anywhere_in_the_k_best() -> None:
    assert top_k_accuracy(SCORES, LABELS, 2) == pytest.approx(5 / 6)  # only sample 4 misses
    assert top_k_accuracy(SCORES, LABELS, 5) == 1.0  # k larger than the classes


def test_localization_needs_the_right_class_and_iou_of_a_half() -> None:
    truth = np.array([[0, 0, 10, 10]] * 6, dtype=float)
    pred = np.array(
        [
            [0, 0, 10, 10],  # exact, class right → correct
            [0, 0, 10, 10],  # exact, class wrong → wrong
            [0, 0, 10, 5],  # IoU 0.5, class right → correct (the threshold is inclusive)
            [0, 0, 10, 4],  # IoU 0.4 → wrong
            [20, 20, 30, 30],  # no overlap, class wrong
            [5, 0, 15, 10],  # IoU 1/3, class right → wrong
        ],
        dtype=float,
    )
    assert box_iou(pred, truth).tolist() == pytest.approx([1, 1, 0.5, 0.4, 0, 1 / 3])
    m = compute_metrics(SCORES, LABELS, ["a", "b", "c"], pred, truth)
    assert m["loc_acc"] == pytest.approx(2 / 6)
    assert m["box_iou_ge_0.5"] == pytest.approx(3 / 6)
    assert summary(m)["mean_iou"] == pytest.approx(round((1 + 1 + 0.5 + 0.4 + 1 / 3) / 6, 4))
    assert "confusion_matrix" not in summary(m)


def test_degenerate_boxes_have_zero_iou() -> None:
    zero = np.array([[5, 5, 5, 5]], dtype=float)
    assert box_iou(zero, zero).tolist() == [0.0]
