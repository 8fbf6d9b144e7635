"""Metrics for a trained model on a labelled folder: a checkpoint, or an exported ONNX model.

Both paths print the same metrics (``training.metrics.compute_metrics``). A checkpoint is
run through training's eval transform; an ONNX model through the service's own
preprocessing and ONNX Runtime, so its numbers are the ones production will see. Boxes of
ONNX models are scored in original-image pixels, after the service's inverse mapping.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from training.checkpoint import model_from_checkpoint
from training.data import ImageDataset, collate_skipping_failures, load_dataset
from training.models import InputNormalize
from training.presets import eval_transform
from training.train import evaluate_predictions, predict, resolve_device


def evaluate_checkpoint(
    checkpoint: Path,
    data: Path,
    *,
    split: str = "val",
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    loaded = model_from_checkpoint(checkpoint)
    index = load_dataset(
        data, splits=(split,), classes=loaded.classes, manifest=loaded.config.manifest
    )
    h, w = loaded.input_size
    dataset = ImageDataset(
        index.splits[split].samples,
        eval_transform(loaded.preprocessing, h, w),
        with_boxes=index.with_boxes,
    )
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skipping_failures)
    dev = resolve_device(device)
    model = loaded.model.to(dev)
    normalize = InputNormalize(loaded.preprocessing.mean, loaded.preprocessing.std).to(dev)
    started = time.perf_counter()
    pred = predict(model, loader, dev, normalize, progress=progress)
    elapsed = time.perf_counter() - started
    metrics = evaluate_predictions(pred, loaded.classes)
    metrics["images_per_s"] = len(pred["labels"]) / elapsed
    metrics["model"] = str(checkpoint)
    metrics["skipped"] = len(index.splits[split].skipped)
    return metrics
