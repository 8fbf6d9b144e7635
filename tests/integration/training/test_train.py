"""Real (tiny) training runs: outputs, resume, fine-tuning from a weights file, CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_train_config
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.config import TrainConfig
from training.models import build_model
from training.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_epoch_run(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "two"
    cfg = TrainConfig.model_validate(
        tiny_train_config(tiny_demo, out, epochs=2, keep_epoch_checkpoints=True, ema_decay=0.9)
    )
    result = train(cfg, progress=False)
    assert result.run_dir == out
    return out


def test_a_run_writes_checkpoints_metrics_and_plots(two_epoch_run: Path) -> None:
    for name in (
        "last.pt",
        "best.pt",
        "epoch_001.pt",
        "epoch_002.pt",
        "metrics.csv",
        "curves.png",
        "confusion_matrix.png",
        "per_class.csv",
        "per_class.md",
        "data_report.json",
    ):
        assert (two_epoch_run / name).is_file(), name
    with open(two_epoch_run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for key in ("train_loss", "val_loss", "top1", "top5", "mean_iou", "loc_acc", "lr"):
        assert key in rows[0]
    state = load_checkpoint(two_epoch_run / "last.pt")
    assert state["epoch"] == 2
    assert state["classes"] == [str(d) for d in range(10)]
    assert state["task"] == "localization"
    assert state["preprocessing"]["resize_mode"] == "stretch"
    assert TrainConfig.model_validate(state["config"]).epochs == 2


def test_resume_continues_at_the_next_epoch_with_optimizer_state(
    two_epoch_run: Path, tmp_path: Path
) -> None:
    uninterrupted = load_checkpoint(two_epoch_run / "last.pt")
    epoch1 = load_checkpoint(two_epoch_run / "epoch_001.pt")
    steps_per_epoch = epoch1["optimizer"]["state"][0]["step"]
    assert float(steps_per_epoch) > 0

    result = train(resume=two_epoch_run / "epoch_001.pt", progress=False)
    resumed = load_checkpoint(result.last_checkpoint)
    assert [row["epoch"] for row in result.history] == [1, 2]  # epoch 1 not trained again
    assert resumed["epoch"] == 2
    # the optimizer carried on: its step count doubled instead of restarting from zero
    assert float(resumed["optimizer"]["state"][0]["step"]) == 2 * float(steps_per_epoch)
    # and the resumed run ends where the uninterrupted one did
    for key, value in uninterrupted["model"].items():
        assert torch.allclose(value.float(), resumed["model"][key].float(), atol=1e-4), key


def test_two_stage_finetune_from_a_weights_file(
    two_epoch_run: Path, tiny_demo: Path, tmp_path: Path
) -> None:
    source = model_from_checkpoint(two_epoch_run / "best.pt").model
    model = build_model(
        "mobilenet_v3_small", 3, (48, 48), with_boxes=True, weights_file=two_epoch_run / "best.pt"
    )
    for key, value in source.trunk.state_dict().items():
        assert torch.equal(value, model.trunk.state_dict()[key]), key
    assert model.classifier.weight.shape[0] == 3

    # A real two-stage fine-tune from that file: stage 1 (one epoch) trains the heads on
    # the frozen trunk, stage 2 unfreezes the trunk at lr x backbone_lr_mult.
    cfg = TrainConfig.model_validate(
        tiny_train_config(
            tiny_demo,
            tmp_path / "ft",
            weights_file=two_epoch_run / "best.pt",
            freeze_epochs=1,
            epochs=2,
            lr=0.01,
            backbone_lr_mult=0.1,
            keep_epoch_checkpoints=True,
        )
    )
    result = train(cfg, progress=False)
    assert [(row["epoch"], row["stage"]) for row in result.history] == [(1, 1), (2, 2)]

    stage1 = load_checkpoint(tmp_path / "ft" / "epoch_001.pt")
    for key, value in source.trunk.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(value, stage1["model"][f"trunk.{key}"]), key
    assert not torch.equal(stage1["model"]["classifier.weight"], source.classifier.weight)
    assert {g["initial_lr"] for g in stage1["optimizer"]["param_groups"]} == {0.01}

    stage2 = load_checkpoint(result.last_checkpoint)
    trunk_keys = [f"trunk.{k}" for k in source.trunk.state_dict()]
    assert any(not torch.equal(stage1["model"][k], stage2["model"][k]) for k in trunk_keys)
    # Stage 2's optimizer: heads at lr, the trunk at lr x 0.1 (two groups each: decay or not).
    assert sorted({g["initial_lr"] for g in stage2["optimizer"]["param_groups"]}) == [
        pytest.approx(0.001),
        pytest.approx(0.01),
    ]

    # Resumed after stage 1, the run builds stage 2 afresh and ends where it did.
    resumed = train(resume=tmp_path / "ft" / "epoch_001.pt", progress=False)
    assert [row["stage"] for row in resumed.history] == [1, 2]
    again = load_checkpoint(resumed.last_checkpoint)["model"]
    for key, value in stage2["model"].items():
        assert torch.allclose(value.float(), again[key].float(), atol=1e-4), key


def test_cli_evaluate_prints_metrics_json(two_epoch_run: Path, tiny_demo: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "-q",
            "evaluate",
            str(two_epoch_run / "best.pt"),
            "--data",
            str(tiny_demo),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    metrics = json.loads(out.stdout)
    assert metrics["samples"] == 40
    for key in ("top1", "top5", "loc_acc", "mean_iou", "images_per_s"):
        assert key in metrics
    best = load_checkpoint(two_epoch_run / "best.pt")["metrics"]
    assert metrics["top1"] == pytest.approx(best["top1"], abs=1e-6)


def test_cli_rejects_bad_config_clearly(tiny_demo: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "train",
            "--data",
            str(tiny_demo),
            "--output",
            str(tmp_path),
            "--backbone",
            "resnet19",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "unknown backbone 'resnet19'" in out.stderr and "mobilenet_v3_small" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "options",
    [
        {"class_balance": "sampler", "optimizer": "sgd", "lr": 0.05},
        {
            "class_balance": "loss",
            "tensorboard": True,
            "epochs": 5,
            "early_stopping_patience": 1,
            "lr": 1e-9,
        },
        {
            "resize_mode": "letterbox",
            "augment": {"rotation": 10, "zoom_out": 0.5, "trivial_augment": True},
        },
    ],
    ids=["sampler-sgd", "loss-tensorboard-early-stop", "letterbox-augment"],
)
def test_training_options(tiny_demo: Path, tmp_path: Path, options: dict[str, object]) -> None:
    cfg = TrainConfig.model_validate(tiny_train_config(tiny_demo, tmp_path / "run", **options))
    result = train(cfg, progress=False)
    assert result.best_checkpoint.is_file()
    if options.get("tensorboard"):
        assert any((tmp_path / "run" / "tensorboard").iterdir())
    if options.get("early_stopping_patience"):
        # Patience 1: the run ends at the first epoch whose loc_acc does not beat the best.
        best, expected = -1.0, len(result.history)
        for row in result.history:
            if row["loc_acc"] <= best:
                expected = row["epoch"]
                break
            best = row["loc_acc"]
        assert len(result.history) == min(expected, 5)
