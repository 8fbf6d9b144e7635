"""Real servers in real subprocesses, on free ports, for the integration tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.processes import ServerProcess as _ServerProcess
from service.client import ClassifierClient


class ServerProcess(_ServerProcess):
    def client(self, **kwargs: object) -> ClassifierClient:
        return ClassifierClient(self.target, **kwargs)  # type: ignore[arg-type]


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
