"""Shared fixtures: a tiny offline demo dataset, quick training configs built from it, a
briefly trained demo model, and a headless browser."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# Under pytest-xdist several test processes share the cores. OpenMP's idle threads spin,
# so two processes training with a thread per core each slowed to a crawl (the quick
# model took 600 s instead of 50). Passive waiting keeps a thread per core (the same
# arithmetic as a serial run) without the spinning. Set before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


@pytest.fixture(scope="session")
def quick_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real, briefly trained and exported demo model (``tests.fixtures``), built once per
    run however many workers ask. Returns the dataset root, the checkpoint, and the model
    repository holding ``demo/1/model.onnx``."""
    from tests.fixtures import build_quick_model, cached, quick_model_paths, shared_root

    base = cached("quick-model", build_quick_model, shared_root(tmp_path_factory))
    return quick_model_paths(base)


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Debian's Chromium, headless, driven by selenium through Debian's chromedriver."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            "no Chromium here: install Debian's chromium and chromium-driver (.ci/run does)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        # The network is closed here: no update checks, sync or other background traffic.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
