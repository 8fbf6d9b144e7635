"""The device run's prepare: a step made once is not made again, and a run whose prepare
was ended with the call that started it (a non-root user's processes are) starts it anew
instead of waiting on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.device import run

STEPS = {"quick_model", "demo_data", "demo_export", "gate_data", "resnet50_export"}


def test_prepare_makes_each_step_once_and_says_who_runs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []

    def fake_sh(command: list[str], timeout: float, log_file: Path, env: Any = None) -> Any:
        made.append(log_file.name.removeprefix("prepare-").removesuffix(".log"))
        assert env == {"OMP_WAIT_POLICY": "PASSIVE"}  # two lanes share the cores
        return {"rc": 1 if "resnet50" in log_file.name else 0, "seconds": 0.1, "tail": []}

    monkeypatch.setattr(run, "sh", fake_sh)
    run.prepare(tmp_path)
    assert set(made) == STEPS
    assert (tmp_path / "prepare.pid").read_text() == str(os.getpid())
    assert (tmp_path / "prepare.json").is_file()
    made.clear()
    run.prepare(tmp_path)
    assert made == ["resnet50_export"]  # only the step that failed is made again


def test_a_run_starts_prepare_only_when_nothing_finished_or_runs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[Path] = []

    def fake_prepare(work: Path) -> int:
        started.append(work)
        return 0

    monkeypatch.setattr(run, "prepare", fake_prepare)

    (tmp_path / "prepare.pid").write_text(str(os.getpid()))  # alive: it is this process
    assert run.ensure_preparing(tmp_path) is None

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "prepare.pid").write_text(str(gone.pid))  # ended with its call
    thread = run.ensure_preparing(tmp_path)
    assert thread is not None
    thread.join(10)
    assert started == [tmp_path] and (tmp_path / "prepare.started").is_file()

    (tmp_path / "prepare.json").write_text("{}")  # finished: nothing to start
    assert run.ensure_preparing(tmp_path) is None
    assert started == [tmp_path]
