"""Real servers in real subprocesses, on free ports, for the integration tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.client import ClassifierClient

ROOT = Path(__file__).resolve().parents[3]


class ServerProcess:
    """``python -m service`` on port 0; learns its ports from the JSON 'listening' log."""

    def __init__(self, repository: Path, *args: str, env: dict[str, str] | None = None):
        self.repository = repository
        self.events: list[dict[str, object]] = []
        self._lines = threading.Condition()
        command = [
            sys.executable,
            "-m",
            "service",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--model-repository",
            str(repository),
            "--log-format",
            "json",
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        threading.Thread(target=self._read, daemon=True).start()
        listening = self.wait_for_event("listening", timeout=60)
        self.port = int(listening["grpc_port"])  # type: ignore[call-overload]
        self.metrics_port = int(listening["metrics_port"])  # type: ignore[call-overload]
        self.target = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"msg": line.rstrip()}
            with self._lines:
                self.events.append(event)
                self._lines.notify_all()

    def wait_for_event(self, msg: str, timeout: float = 60) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        with self._lines:
            while True:
                for event in self.events:
                    if event.get("msg") == msg:
                        return event
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"server exited ({self.process.returncode}): {self.events[-5:]}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {msg!r} event; last: {self.events[-5:]}")
                self._lines.wait(left)

    def messages(self) -> list[str]:
        with self._lines:
            return [str(e.get("msg")) for e in self.events]

    def client(self, **kwargs: object) -> ClassifierClient:
        return ClassifierClient(self.target, **kwargs)  # type: ignore[arg-type]

    def terminate(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


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
