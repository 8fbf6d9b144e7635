"""Scoring's bookkeeping: shard files, the completed input ranges, and when a rerun may
resume. The crash-and-rerun behaviour itself runs in tests/integration/scoring."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from service.model.results import Box
from service.scoring.job import JobError, JobSpec, ShardStore, check_resume, completed_ranges
from service.scoring.rows import Row, from_record

SPEC = JobSpec(
    inputs=10,
    fingerprint="f" * 16,
    shard_size=3,
    format="parquet",
    task="localize",
    top_k=2,
    model="demo",
    version="1",
)


def rows(*paths: str) -> list[Row]:
    box = Box(1.0, 2.0, 30.0, 40.0, 0.9)
    return [Row(p, ["7", "1"], [0.9, 0.05], [7, 1], box, "regression", "demo", "1") for p in paths]


@pytest.mark.parametrize(
    ("done", "expected"),
    [
        ([], []),
        ([0], [[0, 3]]),
        ([0, 1], [[0, 6]]),  # neighbouring shards merge into one range
        ([0, 2], [[0, 3], [6, 9]]),
        ([3], [[9, 10]]),  # the last shard is short: 10 inputs in shards of 3
        ([0, 1, 2, 3], [[0, 10]]),
    ],
)
def test_completed_ranges_merge_neighbours_and_end_at_the_input_count(
    tmp_path: Path, done: list[int], expected: list[list[int]]
) -> None:
    store = ShardStore(tmp_path / "out", "parquet")
    store.prepare()
    for shard in done:
        store.write(shard, rows(f"img{shard}.jpg"))
    assert completed_ranges(store, SPEC) == expected


def test_parquet_shards_are_the_dataset_and_round_trip(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "out", "parquet")
    store.prepare()
    store.write(0, rows("a.jpg", "b.jpg"))
    assert store.folder == tmp_path / "out" and store.done(0) and not store.done(1)
    back = [from_record(r) for r in pq.read_table(store.path(0)).to_pylist()]
    assert [r.path for r in back] == ["a.jpg", "b.jpg"]
    assert back[0].box is not None and back[0].box.as_tuple() == (1.0, 2.0, 30.0, 40.0)
    assert back[0].labels == ["7", "1"] and back[0].version == "1"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_outputs_are_assembled_from_hidden_shards_in_order(tmp_path: Path, fmt: str) -> None:
    dest = tmp_path / f"out.{fmt}"
    store = ShardStore(dest, fmt)
    store.prepare()
    assert store.folder == tmp_path / f".out.{fmt}.parts"
    store.write(1, rows("c.jpg"))
    store.write(0, rows("a.jpg", "b.jpg"))
    store.assemble(2)
    text = dest.read_text()
    if fmt == "csv":
        paths = [r["path"] for r in csv.DictReader(text.splitlines())]
    else:
        paths = [json.loads(line)["path"] for line in text.splitlines()]
    assert paths == ["a.jpg", "b.jpg", "c.jpg"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_half_written_shard_is_discarded_and_clear_removes_everything(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "out.csv", "csv")
    store.prepare()
    stale = store.folder / ".part-000000.csv.tmp"
    stale.write_text("half a row")
    store.prepare()  # what a rerun after kill -9 does first
    assert not stale.exists() and not store.done(0)
    store.write(0, rows("a.jpg"))
    store.assemble(1)
    store.clear()
    assert not store.folder.exists() and not store.dest.exists()


def test_a_rerun_resumes_only_the_same_job(tmp_path: Path) -> None:
    previous = {"job": {k: getattr(SPEC, k) for k in SPEC.__dataclass_fields__}}
    check_resume(previous, SPEC, allow_model_change=False)  # the same job: fine

    with pytest.raises(JobError, match="different list of inputs"):
        check_resume(previous, replace(SPEC, fingerprint="0" * 16), False)
    with pytest.raises(JobError, match="different list of inputs"):
        check_resume(previous, replace(SPEC, inputs=11), False)
    with pytest.raises(JobError, match="top_k=2, this run has 5"):
        check_resume(previous, replace(SPEC, top_k=5), False)
    with pytest.raises(JobError, match="--allow-model-change"):
        check_resume(previous, replace(SPEC, version="2"), False)
    check_resume(previous, replace(SPEC, version="2"), allow_model_change=True)
