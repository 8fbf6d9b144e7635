"""Real servers in real subprocesses, on free ports, for the integration tests."""

from __future__ import annotations

import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.processes import ServerProcess as _ServerProcess
from bench.processes import tree_rss_mb
from service.client import ClassifierClient
from service.model.sessions import read_metadata
from service.model.spec import ModelSpec, ResizeMode


class ServerProcess(_ServerProcess):
    def client(self, **kwargs: object) -> ClassifierClient:
        return ClassifierClient(self.target, **kwargs)  # type: ignore[arg-type]

    def rss_mb(self) -> float:
        return tree_rss_mb(self.pid)

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return str(urllib.request.urlopen(url, timeout=10).read().decode())

    def series(self) -> list[str]:
        """Every sample line of /metrics (one per series)."""
        return [line for line in self.metrics_text().splitlines() if not line.startswith("#")]


@pytest.fixture
def start_server() -> Iterator[type[ServerProcess]]:
    """Start servers with ``start_server(repository, *flags)``; all are killed afterwards."""
    started: list[ServerProcess] = []

    class Tracked(ServerProcess):
        def __init__(self, repository: Path, *args: str, **kwargs: object):
            super().__init__(repository, *args, **kwargs)  # type: ignore[arg-type]
            started.append(self)

    yield Tracked
    for server in started:
        server.kill()


@pytest.fixture(scope="module")
def demo_server(quick_model: dict[str, Path]) -> Iterator[ServerProcess]:
    """One server on the quick demo model for the read-only tests of a module."""
    server = ServerProcess(quick_model["repository"])
    server.wait_for_event("serving")
    yield server
    server.kill()


def copy_model(source: Path, repository: Path, name: str, version: int) -> Path:
    target = repository / name / str(version)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target / "model.onnx")
    return target / "model.onnx"


def publish(source: Path | bytes, repository: Path, name: str, version: int) -> Path:
    """The documented publish recipe: write into a dot-folder, then rename it."""
    staging = repository / name / f".incoming-{version}"
    staging.mkdir(parents=True)
    if isinstance(source, bytes):
        (staging / "model.onnx").write_bytes(source)
    else:
        shutil.copy(source, staging / "model.onnx")
    final = repository / name / str(version)
    os.rename(staging, final)
    return final / "model.onnx"


def replace_file(path: Path, source: Path | bytes) -> None:
    """Replace a model file atomically (write beside it, then rename over it)."""
    temporary = path.with_name(f".{path.name}.new")
    if isinstance(source, bytes):
        temporary.write_bytes(source)
    else:
        shutil.copy(source, temporary)
    os.replace(temporary, path)


@pytest.fixture(scope="session")
def crop_model(quick_model: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick model re-labelled as a centre-crop model (classification's default
    preprocessing); the graph is the same, only the serving resize changes. Returns a
    repository holding ``crop/1/model.onnx``."""
    from training.export import write_metadata

    repository = tmp_path_factory.mktemp("crop-models")
    path = copy_model(quick_model["model"], repository, "crop", 1)
    spec = ModelSpec.from_metadata(read_metadata(path))
    size = spec.input.height
    preprocessing = spec.preprocessing.model_copy(
        update={"resize_mode": ResizeMode.CENTER_CROP, "resize_size": int(size / 0.875)}
    )
    write_metadata(path, spec.model_copy(update={"preprocessing": preprocessing}))
    return repository
