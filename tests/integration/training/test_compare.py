"""``python -m training compare``: two small backbones, one short epoch each, end to end."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def _compare(tiny_demo: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "training",
        "-q",
        "compare",
        "--data",
        str(tiny_demo),
        "--backbones",
        "lenet5,mobilenet_v3_small",
        "--epochs",
        "1",
        "--freeze-epochs",
        "0",
        "--no-pretrained",
        "--input-size",
        "48",
        "--resize-mode",
        "stretch",
        "--batch-size",
        "16",
        "--num-workers",
        "0",
        "--out",
        str(out),
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)


def test_compare_trains_exports_measures_and_charts(tiny_demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "compare"
    done = _compare(tiny_demo, out)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "compare.csv") as handle:
        rows = {row["backbone"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"lenet5", "mobilenet_v3_small"}
    for name, row in rows.items():
        assert 0.0 <= float(row["top1"]) <= 1.0 and row["loc_acc"] != ""
        assert float(row["latency_ms"]) > 0 and float(row["throughput"]) > 0
        assert Path(row["model"]).is_file()
        assert float(row["size_mb"]) == pytest.approx(Path(row["model"]).stat().st_size / 1e6)
        assert float(row["train_seconds"]) > 0
        assert (out / "runs" / name / "best.pt").is_file()
    # LeNet-5 is the small one (most of its 0.47M parameters are the shared box head's MLP).
    assert int(rows["lenet5"]["parameters"]) < int(rows["mobilenet_v3_small"]["parameters"]) / 2
    assert int(rows["lenet5"]["mult_adds"]) < int(rows["mobilenet_v3_small"]["mult_adds"])
    table = (out / "compare.md").read_text()
    assert table.splitlines()[0].startswith("| backbone | val top-1 |") and "lenet5" in table
    assert table in done.stdout
    chart = Image.open(out / "compare.png")
    assert chart.size[0] > 600 and chart.size[1] > 400

    # A second run reuses the checkpoints and the exports instead of training again; the
    # training time is the one the run recorded.
    again = _compare(tiny_demo, out, "--from-checkpoints")
    assert again.returncode == 0, again.stderr[-3000:]
    with open(out / "compare.csv") as handle:
        reused = {row["backbone"]: row for row in csv.DictReader(handle)}
    for name in rows:
        assert 0 < float(reused[name]["train_seconds"]) <= float(rows[name]["train_seconds"])
        assert reused[name]["model"] == rows[name]["model"]
        assert reused[name]["top1"] == rows[name]["top1"]


def test_compare_refuses_a_recipe_a_backbone_cannot_take(tiny_demo: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "compare",
            "--data",
            str(tiny_demo),
            "--backbones",
            "lenet5,inception_v3",
            "--input-size",
            "48",
            "--no-pretrained",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2
    assert "inception_v3 needs input_size >= 75" in done.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything trained
