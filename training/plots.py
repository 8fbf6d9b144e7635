"""End-of-run figures and tables: training curves, confusion matrix, per-class P/R."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
import numpy as np


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    panels = [
        ("loss", ["train_loss", "val_loss"]),
        ("accuracy", ["top1", "top5", "loc_acc"]),
        ("box", ["mean_iou"]),
    ]
    panels = [(t, [k for k in keys if any(k in row for row in history)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            ax.plot(epochs, [row.get(key, np.nan) for row in history], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], class_names: list[str], path: Path) -> None:
    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.clip(m.sum(axis=1, keepdims=True), 1, None)
    size = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90 if len(class_names) > 12 else 0)
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(class_names) <= 20:
        for i in ticks:
            for j in ticks:
                if m[i, j]:
                    ax.text(
                        j,
                        i,
                        str(int(m[i, j])),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set_title("confusion matrix (rows normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_per_class(rows: list[dict[str, Any]], csv_path: Path) -> str:
    """Write the per-class table as CSV and return it as a markdown table."""
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = "| " + " | ".join(rows[0]) + " |"
    rule = "|" + "---|" * len(rows[0])
    body = ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    return "\n".join([header, rule, *body])
