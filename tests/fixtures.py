"""Fixtures that take a minute to build, built once however many processes ask for them.

``cached(name, build, factory)`` builds into a shared folder under a file lock: the first
pytest-xdist worker to ask builds, the others wait and reuse. The folder is the run's own
(the parent of each worker's base temp), or ``IMGCLF_FIXTURE_CACHE`` when set, which
outlives the run: the GPU device run (bench/device) builds the quick model there before
the GPU tests start, while the rest of the bundle is still on its way.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

CACHE_ENV = "IMGCLF_FIXTURE_CACHE"
_DONE = ".complete"


def shared_root(factory: pytest.TempPathFactory) -> Path:
    """A folder every worker of this run sees (or the persistent cache when configured)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        root = Path(configured)
    else:
        base = factory.getbasetemp()
        # Under xdist each worker's base temp is <run>/popen-gwN: share <run>.
        root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root.mkdir(parents=True, exist_ok=True)
    return root


def cached(name: str, build: Callable[[Path], None], root: Path) -> Path:
    """``root/name``, built by ``build(folder)`` once, under a lock, and reused after."""
    target = root / name
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (target / _DONE).is_file():
            if target.exists():
                shutil.rmtree(target)  # a build that died half-way
            target.mkdir(parents=True)
            build(target)
            (target / _DONE).touch()
    return target


def quick_model_paths(base: Path) -> dict[str, Path]:
    repository = base / "models"
    return {
        "data": base / "demo",
        "checkpoint": base / "run" / "best.pt",
        "repository": repository,
        "model": repository / "demo" / "1" / "model.onnx",
    }


def build_quick_model(base: Path) -> None:
    """A real, briefly trained and exported demo model (about a minute on 2 cores).

    2,000 training images at 64 px for 10 epochs: boxes land on the digits (IoU >= 0.5 on
    ~90% of val images), top-1 is ~60%.
    """
    from training.config import TrainConfig
    from training.demo_data import DemoDataConfig, build_demo_dataset
    from training.export import ExportOptions, export_checkpoint
    from training.train import train

    paths = quick_model_paths(base)
    build_demo_dataset(paths["data"], DemoDataConfig(train_samples=2000, val_samples=300))
    cfg = TrainConfig.from_sources(
        Path(__file__).parent.parent / "training" / "configs" / "demo.yaml",
        # No glimpse head: the serving tests need a model, not the demo's accuracy, and
        # it would cost a fifth more training (test_glimpse and test_export cover it).
        {
            "data": paths["data"],
            "output": base / "run",
            "input_size": 64,
            "epochs": 10,
            "glimpse_size": 0,
        },
    )
    checkpoint = train(cfg, progress=False).best_checkpoint
    if checkpoint != paths["checkpoint"]:
        raise RuntimeError(f"training wrote {checkpoint}, expected {paths['checkpoint']}")
    export_checkpoint(checkpoint, ExportOptions(repository=paths["repository"], name="demo"))
