"""Checkpoint files: what they hold, how they are written (atomically) and read back.

A checkpoint is self-sufficient: model (and EMA) weights, optimizer and scheduler state,
the epoch, the validated TrainConfig, class names, task, input size and the eval preset
(the ModelSpec's preprocessing). ``--resume``, ``evaluate`` and ``export`` need nothing else.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.model.spec import Preprocessing, Task
from training.config import TrainConfig
from training.models import ImageModel, build_model, inference_weights

FORMAT = "imgclf-checkpoint/1"


@dataclass
class LoadedModel:
    model: ImageModel
    config: TrainConfig
    classes: list[str]
    task: Task
    preprocessing: Preprocessing
    input_size: tuple[int, int]
    metrics: dict[str, Any]
    checkpoint: dict[str, Any]


def checkpoint_state(
    *,
    model: dict[str, torch.Tensor],
    config: TrainConfig,
    classes: list[str],
    task: Task,
    input_size: tuple[int, int],
    preprocessing: Preprocessing,
    epoch: int,
    metrics: dict[str, Any] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
    progress: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The one place a checkpoint's contents are spelled out (``model_from_checkpoint``
    reads them back). ``progress``: what only ``--resume`` needs (optimizer, scheduler and
    scaler state, stage, history, early-stopping counters), stored as given."""
    import torchvision

    return {
        "model": model,
        "ema": ema,
        "epoch": epoch,
        "config": config.model_dump(mode="json"),
        "classes": list(classes),
        "task": task.value,
        "input_size": [int(input_size[0]), int(input_size[1])],
        "preprocessing": preprocessing.model_dump(mode="json"),
        "metrics": metrics or {},
        "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
        **(progress or {}),
    }


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temp file and rename, so a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # Our checkpoints hold only tensors and plain containers: weights_only loading works.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a training checkpoint ({FORMAT})")
    return state


def model_from_checkpoint(path: Path) -> LoadedModel:
    state = load_checkpoint(path)
    config = TrainConfig.model_validate(state["config"])
    task = Task(state["task"])
    input_size = (int(state["input_size"][0]), int(state["input_size"][1]))
    model = build_model(
        config.backbone,
        len(state["classes"]),
        input_size,
        with_boxes=task is Task.LOCALIZATION,
        pretrained=config.pretrained,
        weights_file=config.weights_file,
        dropout=config.dropout,
        restoring=True,
        glimpse_size=config.glimpse_size,
    )
    model.load_state_dict(inference_weights(state))
    model.eval()
    return LoadedModel(
        model=model,
        config=config,
        classes=list(state["classes"]),
        task=task,
        preprocessing=Preprocessing.model_validate(state["preprocessing"]),
        input_size=input_size,
        metrics=dict(state.get("metrics") or {}),
        checkpoint=state,
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
