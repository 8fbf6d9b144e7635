"""Shared fixtures: a tiny offline demo dataset and quick training configs built from it."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = {
    "train_samples": 96,
    "val_samples": 40,
    "min_side": 48,
    "max_side": 72,
}


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-class localization dataset (digits on photos), built offline in ~1 s."""
    from training.demo_data import DemoDataConfig, build_demo_dataset

    root = tmp_path_factory.mktemp("data") / "demo"
    build_demo_dataset(root, DemoDataConfig(**TINY))
    return root


def tiny_train_config(data: Path, output: Path, **overrides: object) -> dict[str, object]:
    """Fields of a TrainConfig that trains in a few seconds on the tiny dataset."""
    config: dict[str, object] = {
        "data": data,
        "output": output,
        "backbone": "mobilenet_v3_small",
        "pretrained": False,
        "input_size": 48,
        "resize_mode": "stretch",
        "epochs": 1,
        "freeze_epochs": 0,
        "batch_size": 16,
        "num_workers": 0,
        "augment": {"hflip": 0.0},
    }
    config.update(overrides)
    return config
