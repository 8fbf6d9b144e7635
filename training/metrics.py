"""Classification and localization metrics, in NumPy, shared by training and evaluation.

The same function scores a PyTorch checkpoint and an ONNX model, so "evaluate on the
export" and "val during training" mean the same numbers.

Localization accuracy follows ILSVRC: a prediction is correct when the top-1 class is right
AND its box overlaps the ground truth with IoU ≥ 0.5.
"""

from __future__ import annotations

from typing import Any

import numpy as np

LOC_IOU_THRESHOLD = 0.5


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of two [N, 4] xyxy arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ix = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = ix * iy
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, kth=k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def per_class_table(matrix: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    true_positive = [float(v) for v in np.diag(matrix)]
    predicted = [int(v) for v in matrix.sum(axis=0)]
    support = [int(v) for v in matrix.sum(axis=1)]
    rows = []
    for i, name in enumerate(class_names):
        precision = true_positive[i] / predicted[i] if predicted[i] else 0.0
        recall = true_positive[i] / support[i] if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {
                "class": name,
                "precision": round(precision, 4),
                "recall": round(recall, 4),
                "f1": round(f1, 4),
                "support": int(support[i]),
            }
        )
    return rows


def compute_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    pred_boxes: np.ndarray | None = None,
    true_boxes: np.ndarray | None = None,
) -> dict[str, Any]:
    """Summary metrics plus the confusion matrix and the per-class table.

    ``scores`` [N, K] (probabilities or logits), ``labels`` [N]; boxes [N, 4] xyxy in any
    one coordinate system shared by prediction and truth.
    """
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores)
    predicted = scores.argmax(axis=1)
    matrix = confusion_matrix(labels, predicted, len(class_names))
    out: dict[str, Any] = {
        "samples": len(labels),
        "top1": top_k_accuracy(scores, labels, 1),
        "top5": top_k_accuracy(scores, labels, 5),
    }
    if pred_boxes is not None and true_boxes is not None:
        iou = box_iou(pred_boxes, true_boxes)
        out["mean_iou"] = float(iou.mean())
        out["box_iou_ge_0.5"] = float((iou >= LOC_IOU_THRESHOLD).mean())
        out["loc_acc"] = float(((predicted == labels) & (iou >= LOC_IOU_THRESHOLD)).mean())
    out["confusion_matrix"] = matrix.tolist()
    out["per_class"] = per_class_table(matrix, class_names)
    return out


def summary(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar part of ``compute_metrics``' result, rounded for printing."""
    return {
        k: round(float(v), 4)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
