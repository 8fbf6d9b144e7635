"""The lock files: what `make setup` installed is exactly requirements/dev.lock, the serving
lock carries nothing serving does not import, and the CPU and GPU images run the same
onnxruntime."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def pins(lock: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (ROOT / "requirements" / lock).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line)
        if match:
            name = re.sub(r"\[.*\]", "", match.group(1))
            out[re.sub(r"[-_.]+", "-", name).lower()] = match.group(2)
    return out


def test_the_environment_holds_exactly_the_locked_versions() -> None:
    wrong = {}
    for name, version in pins("dev.lock").items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            wrong[name] = f"{installed} (locked {version})"
    assert not wrong, f"run `make setup` to install requirements/dev.lock: {wrong}"


def test_the_serving_lock_is_lean_and_scoring_adds_to_it() -> None:
    serve, scoring, dev = pins("serve.lock"), pins("scoring.lock"), pins("dev.lock")
    for heavy in ("torch", "torchvision", "pyarrow", "tqdm", "ray", "matplotlib"):
        assert heavy not in serve, heavy
    assert {"pyarrow", "tqdm"} <= set(scoring)
    # One resolution: every package the locks share has one version everywhere.
    for name, version in serve.items():
        assert scoring.get(name, version) == version == dev.get(name, version), name


def test_cpu_and_gpu_images_install_the_locks_and_the_same_onnxruntime() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "requirements/serve.lock" in dockerfile and "requirements/scoring.lock" in dockerfile
    assert "requirements/gpu.txt" in dockerfile  # the gpu target's additions
    gpu = pins("gpu.txt")
    assert gpu["onnxruntime-gpu"] == pins("serve.lock")["onnxruntime"]
    # What GPU decoding imports, at the versions the rest of the locks use.
    assert {"nvidia-nvimgcodec-cu13", "nvidia-nvjpeg", "onnx"} <= set(gpu)
    assert gpu["onnx"] == pins("dev.lock")["onnx"]
    constraints = (ROOT / "requirements" / "constraints.txt").read_text()
    assert f"onnxruntime=={gpu['onnxruntime-gpu']}" in constraints
