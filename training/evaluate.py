"""Metrics for a trained model on a labelled folder: a checkpoint, or an exported ONNX model.

Also the torch side's shared pieces: ``predict`` (a model over a loader) and
``evaluate_predictions``, which training's per-epoch evaluation uses too, so imports run
train → evaluate and never back.

Both paths print the same metrics (``training.metrics.compute_metrics``). A checkpoint is
run through training's eval transform; an ONNX model through the service's own
preprocessing and ONNX Runtime, so its numbers are the ones production will see. Boxes of
ONNX models are scored in original-image pixels, after the service's inverse mapping.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from service.model.offline import run_pipeline
from service.model.postprocess import cam_box, regression_box
from service.model.runner import Runner
from service.model.runner_options import CPU, RunnerOptions
from training.checkpoint import model_from_checkpoint
from training.data import ImageDataset, collate_skipping_failures, eval_decoder, load_dataset
from training.metrics import compute_metrics
from training.models import InputNormalize
from training.presets import eval_transform


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    normalize: InputNormalize,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Run a model over a loader: probabilities, labels, predicted and true boxes."""
    model.eval()
    probs, labels, pred_boxes, true_boxes = [], [], [], []
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
        if batch is None:
            continue
        images, y, boxes = batch
        logits, pb, _ = model(normalize(images.to(device, non_blocking=True)))
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(y)
        true_boxes.append(boxes)
        if pb is not None:
            pred_boxes.append(pb.float().cpu())
    out = {
        "probs": torch.cat(probs).numpy(),
        "labels": torch.cat(labels).numpy(),
        "true_boxes": torch.cat(true_boxes).numpy(),
    }
    if pred_boxes:
        out["pred_boxes"] = torch.cat(pred_boxes).numpy()
    return out


def evaluate_predictions(pred: dict[str, np.ndarray], classes: list[str]) -> dict[str, Any]:
    with_boxes = "pred_boxes" in pred and not np.isnan(pred["true_boxes"]).any()
    return compute_metrics(
        pred["probs"],
        pred["labels"],
        classes,
        pred.get("pred_boxes") if with_boxes else None,
        pred["true_boxes"] if with_boxes else None,
    )


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
        decode=eval_decoder(loaded.preprocessing, h, w),
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


def evaluate_onnx(
    model_path: Path,
    data: Path,
    *,
    split: str = "val",
    batch_size: int = 32,
    threads: int = 0,
    max_images: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score an exported model through the serving code: preprocess → runner → postprocess.

    Boxes are compared in original-image pixels, after the service's inverse mapping. For
    models that export CAMs, the CAM-derived box is scored too (``cam_loc_acc``).
    """
    runner = Runner(model_path, RunnerOptions(providers=[CPU], intra_op_threads=threads))
    spec = runner.spec
    index = load_dataset(data, splits=(split,), classes=spec.labels)
    samples = index.splits[split].samples[:max_images]
    h, w = spec.input.height, spec.input.width
    probs, labels, boxes, cam_boxes, true_boxes = [], [], [], [], []
    failed = 0
    started = time.perf_counter()
    outcomes = run_pipeline(runner, [s.path for s in samples], batch_size=batch_size)
    for outcome in tqdm(outcomes, total=len(samples), disable=not progress, desc="evaluate"):
        sample = samples[outcome.index]
        if outcome.outputs is None or outcome.geometry is None:
            failed += 1
            continue
        p = outcome.outputs[spec.outputs.probabilities]
        probs.append(p)
        labels.append(sample.label)
        if sample.box is None:
            continue
        true_boxes.append(sample.box)
        top_score = float(p.max())
        if spec.outputs.boxes is not None:
            box = regression_box(
                outcome.outputs[spec.outputs.boxes], outcome.geometry, h, w, top_score
            )
            boxes.append(box.as_tuple())
        if spec.has_cam:
            top1_cam = outcome.outputs[str(spec.outputs.cam)][0]
            derived = cam_box(top1_cam, outcome.geometry, h, w, spec.cam_threshold, top_score)
            cam_boxes.append(derived.as_tuple())
    elapsed = time.perf_counter() - started
    if not probs:
        raise ValueError(f"{data}: no {split} image could be scored")
    scores, truth = np.stack(probs), np.array(labels)
    has_truth = len(true_boxes) == len(labels)
    metrics = compute_metrics(
        scores,
        truth,
        spec.labels,
        np.array(boxes) if boxes and has_truth else None,
        np.array(true_boxes) if boxes and has_truth else None,
    )
    if cam_boxes and has_truth:
        cam = compute_metrics(scores, truth, spec.labels, np.array(cam_boxes), np.array(true_boxes))
        metrics["cam_loc_acc"] = cam["loc_acc"]
        metrics["cam_mean_iou"] = cam["mean_iou"]
    metrics["images_per_s"] = len(samples) / elapsed
    metrics["model"] = str(model_path)
    metrics["failed"] = failed
    metrics["skipped"] = len(index.splits[split].skipped)
    return metrics


def evaluate(model: Path, data: Path, **kwargs: Any) -> dict[str, Any]:
    """A checkpoint (.pt) or an exported model (.onnx): the same metrics either way."""
    if Path(model).suffix == ".onnx":
        kwargs.pop("device", None)
        return evaluate_onnx(model, data, **kwargs)
    kwargs.pop("threads", None)
    return evaluate_checkpoint(model, data, **kwargs)
