"""Offline scoring: engines agree, bad files become error rows, kill -9 then rerun gives
every input exactly once, outputs round-trip, and unsafe resumes are refused."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.integration.service.conftest import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CORRUPT = "zz-corrupt.jpg"


@pytest.fixture(scope="module")
def inputs(quick_model: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 demo val images in nested folders, plus one corrupt file."""
    root = tmp_path_factory.mktemp("inputs")
    sources = sorted((quick_model["data"] / "val").rglob("*.jpg"))[:60]
    for i, source in enumerate(sources):
        target = root / f"batch{i % 3}" / source.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(source, target)
    (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def score(
    *args: str, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run(
        [sys.executable, "-m", "service.scoring", "--no-progress", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def read_rows(output: Path) -> list[dict[str, Any]]:
    if output.suffix == ".csv":
        with open(output, newline="") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            for key in ("labels", "scores", "indices"):
                row[key] = json.loads(row[key])
            for key, value in list(row.items()):
                if value == "":
                    row[key] = None
                elif key.startswith("box_") and key != "box_source":
                    row[key] = float(value)
        return rows
    if output.suffix == ".jsonl":
        return [json.loads(line) for line in output.read_text().splitlines()]
    return pq.read_table(output).to_pylist()


def test_local_engine_scores_every_input_and_reports_bad_files(
    quick_model: dict[str, Path], inputs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores"
    done = score(
        "--model",
        str(quick_model["repository"] / "demo"),
        "--input",
        str(inputs),
        "--output",
        str(out),
        "--task",
        "localize",
        "--shard-size",
        "16",
    )
    assert "scored 61 of 61 inputs" in done.stdout and "1 errors" in done.stdout
    rows = read_rows(out)
    assert len(rows) == 61 == len({r["path"] for r in rows})
    bad = [r for r in rows if r["error"]]
    assert [Path(r["path"]).name for r in bad] == [CORRUPT]
    assert "image" in bad[0]["error"] and bad[0]["labels"] == []
    good = [r for r in rows if not r["error"]]
    assert all(len(r["labels"]) == 5 and r["box_source"] == "regression" for r in good)
    assert all(r["model"] == "demo" and r["version"] == "1" for r in rows)
    manifest = json.loads((out / "_scoring.json").read_text())
    assert manifest["status"] == "complete" and manifest["completed"] == [[0, 61]]


def _engine_rows(
    engine_args: list[str],
    model: str,
    inputs: Path,
    out: Path,
    env: dict[str, str] | None = None,
) -> list[dict]:  # type: ignore[type-arg]
    score(
        "--model",
        model,
        "--input",
        str(inputs),
        "--output",
        str(out),
        "--task",
        "localize",
        *engine_args,
        env=env,
    )
    return read_rows(out)


def test_local_grpc_and_ray_engines_agree(
    quick_model: dict[str, Path], inputs: Path, tmp_path: Path
) -> None:
    model = str(quick_model["repository"] / "demo")
    local = _engine_rows([], model, inputs, tmp_path / "local")
    server = ServerProcess(quick_model["repository"])
    try:
        server.wait_for_event("serving")
        remote = _engine_rows(
            [
                "--engine",
                "grpc",
                "--target",
                server.target,
                "--images-per-request",
                "7",
                "--concurrency",
                "3",
            ],
            "demo",
            inputs,
            tmp_path / "grpc",
        )
    finally:
        server.kill()
    # The actors' temporary files in a folder of the test's own (Ray's session stays in
    # the usual place: its socket paths must stay short).
    actor_tmp = tmp_path / "actor-tmp"
    actor_tmp.mkdir()
    ray = _engine_rows(
        ["--engine", "ray", "--num-cpus", "2", "--batch-size", "16"],
        model,
        inputs,
        tmp_path / "ray",
        env={"TMPDIR": str(actor_tmp), "RAY_TMPDIR": tempfile.gettempdir()},
    )
    assert list(actor_tmp.glob("scoring-*.onnx")) == []  # each actor's model copy removed
    for other in (remote, ray):
        assert [r["path"] for r in other] == [r["path"] for r in local]
        for a, b in zip(local, other, strict=True):
            assert a["labels"] == b["labels"], a["path"]
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
            assert bool(a["error"]) == bool(b["error"])
            if not a["error"]:
                for key in ("box_x_min", "box_y_min", "box_x_max", "box_y_max"):
                    assert a[key] == pytest.approx(b[key], abs=1e-3)


@pytest.mark.parametrize("name", ["scores.csv", "scores.jsonl", "scores"])
def test_formats_round_trip(
    quick_model: dict[str, Path], inputs: Path, tmp_path: Path, name: str
) -> None:
    model = str(quick_model["repository"] / "demo")
    expected = _engine_rows([], model, inputs, tmp_path / "reference")
    got = _engine_rows(["--shard-size", "25"], model, inputs, tmp_path / name)
    assert len(got) == len(expected) == 61
    for a, b in zip(expected, got, strict=True):
        assert a["path"] == b["path"] and a["labels"] == b["labels"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-6)
        assert a["error"] == b["error"]
        assert a["box_x_min"] == pytest.approx(b["box_x_min"], abs=1e-4)
    if name != "scores":
        assert (
            not (tmp_path / f".{name}.parts").exists()
            or (tmp_path / f".{name}.parts" / "_scoring.json").is_file()
        )


def test_manifests_as_input(quick_model: dict[str, Path], inputs: Path, tmp_path: Path) -> None:
    images = sorted(p for p in inputs.rglob("*.jpg"))[:10]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in images) + "\n")
    table = tmp_path / "list.csv"
    table.write_text("path,other\n" + "".join(f"{p},x\n" for p in images))
    for manifest in (listing, table):
        out = tmp_path / f"out-{manifest.suffix[1:]}.jsonl"
        score(
            "--model",
            str(quick_model["repository"] / "demo"),
            "--input",
            str(manifest),
            "--output",
            str(out),
        )
        assert [r["path"] for r in read_rows(out)] == [str(p) for p in images]


def test_sigkill_midway_then_rerun_scores_each_input_exactly_once(
    quick_model: dict[str, Path], tmp_path: Path
) -> None:
    folder = quick_model["data"] / "train"
    model = str(quick_model["repository"] / "demo")
    reference = tmp_path / "reference"
    score(
        "--model", model, "--input", str(folder), "--output", str(reference), "--shard-size", "50"
    )
    out = tmp_path / "scores"
    command = [
        sys.executable,
        "-m",
        "service.scoring",
        "--no-progress",
        "--model",
        model,
        "--input",
        str(folder),
        "--output",
        str(out),
        "--shard-size",
        "50",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 3:
        assert process.poll() is None, "finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(list(out.glob("part-*.parquet")))
    assert 3 <= done_before < 40  # 2,000 inputs / 50 per shard: stopped midway
    rerun = score(
        "--model", model, "--input", str(folder), "--output", str(out), "--shard-size", "50"
    )
    assert f"({done_before * 50} already done)" in rerun.stdout
    expected, got = read_rows(reference), read_rows(out)
    assert len(got) == 2000 == len({r["path"] for r in got})
    assert [r["path"] for r in got] == [r["path"] for r in expected]
    for a, b in zip(expected, got, strict=True):
        assert a["labels"] == b["labels"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-6)
    assert not list(out.glob(".*.tmp"))


def test_unsafe_resumes_are_refused(
    quick_model: dict[str, Path], inputs: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    (repository / "demo" / "1").mkdir(parents=True)
    shutil.copy(quick_model["model"], repository / "demo" / "1" / "model.onnx")
    out = tmp_path / "scores"
    base = ["--model", str(repository / "demo"), "--output", str(out)]
    score(*base, "--input", str(inputs / "batch0"))
    other_inputs = score(*base, "--input", str(inputs / "batch1"), check=False)
    assert other_inputs.returncode == 2
    assert "different list of inputs" in other_inputs.stderr

    (repository / "demo" / "2").mkdir()
    shutil.copy(quick_model["model"], repository / "demo" / "2" / "model.onnx")
    newer = score(*base, "--input", str(inputs / "batch0"), check=False)
    assert newer.returncode == 2 and "--allow-model-change" in newer.stderr
    allowed = score(*base, "--input", str(inputs / "batch0"), "--allow-model-change")
    assert "already done" in allowed.stdout
    fresh = score(*base, "--input", str(inputs / "batch1"), "--overwrite")
    assert "scored 20 of 20 inputs (0 already done)" in fresh.stdout
    assert {r["version"] for r in read_rows(out)} == {"2"}


def test_grpc_engine_waits_out_a_full_queue_and_still_isolates_bad_images(
    quick_model: dict[str, Path], inputs: Path, tmp_path: Path
) -> None:
    # A queue of 4 images and 8 requests of 4 in flight: most requests are refused as
    # "queue_full" at first; the engine backs off and resends them instead of turning
    # healthy images into error rows. The corrupt file still becomes one error row.
    server = ServerProcess(
        quick_model["repository"],
        "--max-queue-size",
        "4",
        "--max-images-per-request",
        "4",
        "--max-queue-delay-us",
        "20000",
    )
    try:
        server.wait_for_event("serving")
        rows = _engine_rows(
            [
                "--engine",
                "grpc",
                "--target",
                server.target,
                "--images-per-request",
                "4",
                "--concurrency",
                "8",
            ],
            "demo",
            inputs,
            tmp_path / "grpc",
        )
        refused = sum(
            float(line.rsplit(" ", 1)[1])
            for line in server.series()
            if line.startswith("classifier_requests_total") and "RESOURCE_EXHAUSTED" in line
        )
    finally:
        server.kill()
    assert refused > 0  # the retry path really ran
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert list(errors) == [CORRUPT] and "image 0" in errors[CORRUPT]
    assert len(rows) == 61
