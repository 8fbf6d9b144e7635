"""A scoring job: numbered inputs → numbered shards, each committed once, resumable.

Exactly once: the input list is fixed (and fingerprinted) at the start; shard k holds the
rows of inputs [k·S, (k+1)·S). A shard is written to a temp file and renamed into place,
so it either exists whole or not at all; ``_scoring.json`` beside the shards records the
job (inputs, model, format) and the completed input ranges. A rerun of the same command
after a crash — even ``kill -9`` mid-shard — scores only the shards that are missing:
no input twice, none forgotten. A rerun with other inputs, or a model of another version,
is refused unless told (``--overwrite`` starts afresh; ``--allow-model-change`` goes on).

Parquet output is a dataset folder of the shards themselves. CSV and JSONL outputs are a
single file assembled (atomically) from hidden shards once every shard is done.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow.parquet as pq
from tqdm import tqdm

from service.scoring.rows import SCHEMA, Row, to_flat, to_record, to_table

log = logging.getLogger(__name__)

MANIFEST = "_scoring.json"
FORMATS = ("parquet", "csv", "jsonl")


class JobError(RuntimeError):
    """The job cannot run as asked (e.g. it would mix inputs or models)."""


class Engine(Protocol):
    model: str
    version: str

    def score(self, paths: list[str]) -> Iterator[Row]:
        """One row per path, in order."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class JobSpec:
    inputs: int
    fingerprint: str
    shard_size: int
    format: str
    task: str
    top_k: int
    model: str
    version: str


@dataclass
class Summary:
    inputs: int
    scored: int
    skipped: int
    errors: int
    seconds: float
    output: str

    @property
    def images_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"scored {self.scored} of {self.inputs} inputs ({self.skipped} already done), "
            f"{self.errors} errors, {self.images_per_s:.1f} img/s, {self.seconds:.1f} s "
            f"→ {self.output}"
        )


def output_format(dest: Path, requested: str | None) -> str:
    if requested:
        if requested not in FORMATS:
            raise JobError(f"format must be one of {', '.join(FORMATS)}")
        return requested
    suffix = dest.suffix.lower().lstrip(".")
    return suffix if suffix in ("csv", "jsonl") else "parquet"


class ShardStore:
    def __init__(self, dest: Path, fmt: str):
        self.dest, self.format = dest, fmt
        self.folder = dest if fmt == "parquet" else dest.with_name(f".{dest.name}.parts")
        self.ext = fmt

    def path(self, shard: int) -> Path:
        return self.folder / f"part-{shard:06d}.{self.ext}"

    def done(self, shard: int) -> bool:
        return self.path(shard).is_file()

    def clear(self) -> None:
        for target in (self.folder, self.dest):
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def prepare(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp"):  # a shard a crash left half-written
            stale.unlink()

    def write(self, shard: int, rows: list[Row]) -> None:
        target = self.path(shard)
        tmp = target.with_name(f".{target.name}.tmp")
        if self.format == "parquet":
            pq.write_table(to_table(rows), tmp)
        elif self.format == "jsonl":
            with open(tmp, "w") as handle:
                for row in rows:
                    handle.write(json.dumps(to_record(row)) + "\n")
        else:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=SCHEMA.names)
                for row in rows:
                    writer.writerow(to_flat(to_record(row)))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)

    def read_manifest(self) -> dict[str, Any] | None:
        path = self.folder / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None

    def write_manifest(self, data: dict[str, Any]) -> None:
        path = self.folder / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)

    def assemble(self, shards: int) -> None:
        """CSV/JSONL: concatenate the shards into the destination file, atomically."""
        if self.format == "parquet":
            return
        tmp = self.dest.with_name(f".{self.dest.name}.tmp")
        with open(tmp, "w", newline="") as out:
            if self.format == "csv":
                csv.writer(out).writerow(SCHEMA.names)
            for shard in range(shards):
                with open(self.path(shard), newline="") as part:
                    shutil.copyfileobj(part, out)
        os.replace(tmp, self.dest)


def completed_ranges(store: ShardStore, spec: JobSpec) -> list[list[int]]:
    ranges: list[list[int]] = []
    for shard in range(_shard_count(spec)):
        if store.done(shard):
            start, end = shard * spec.shard_size, min(spec.inputs, (shard + 1) * spec.shard_size)
            if ranges and ranges[-1][1] == start:
                ranges[-1][1] = end
            else:
                ranges.append([start, end])
    return ranges


def _shard_count(spec: JobSpec) -> int:
    return (spec.inputs + spec.shard_size - 1) // spec.shard_size


def check_resume(previous: dict[str, Any], spec: JobSpec, allow_model_change: bool) -> None:
    old = previous.get("job", {})
    if old.get("fingerprint") != spec.fingerprint or old.get("inputs") != spec.inputs:
        raise JobError(
            "the output holds results for a different list of inputs; use a new "
            "output or --overwrite"
        )
    for key in ("shard_size", "format", "task", "top_k"):
        if old.get(key) != getattr(spec, key):
            raise JobError(
                f"the output was written with {key}={old.get(key)!r}, this run has "
                f"{getattr(spec, key)!r}; use the same settings or --overwrite"
            )
    if (old.get("model"), old.get("version")) != (spec.model, spec.version):
        if not allow_model_change:
            raise JobError(
                f"the output was scored with model {old.get('model')} version "
                f"{old.get('version')}, this run uses {spec.model} version "
                f"{spec.version}; pass --allow-model-change to continue with it "
                "(rows record their version) or --overwrite to start again"
            )
        log.warning(
            "continuing with model %s version %s (was %s)",
            spec.model,
            spec.version,
            old.get("version"),
        )


def run_job(
    engine: Engine,
    paths: list[str],
    dest: Path,
    *,
    spec: JobSpec,
    overwrite: bool = False,
    allow_model_change: bool = False,
    progress: bool = True,
) -> Summary:
    store = ShardStore(dest, spec.format)
    if overwrite:
        store.clear()
    previous = store.read_manifest()
    if previous is not None:
        check_resume(previous, spec, allow_model_change)
    elif store.folder.is_dir() and any(store.folder.iterdir()):
        raise JobError(
            f"{store.folder} exists and is not a scoring output; pick another "
            "output or pass --overwrite"
        )
    store.prepare()
    manifest: dict[str, Any] = {"job": asdict(spec), "status": "running"}
    store.write_manifest({**manifest, "completed": completed_ranges(store, spec)})

    shards = _shard_count(spec)
    pending = [k for k in range(shards) if not store.done(k)]
    todo = [p for k in pending for p in paths[k * spec.shard_size : (k + 1) * spec.shard_size]]
    skipped = spec.inputs - len(todo)
    started = time.perf_counter()
    errors = scored = 0
    bar = tqdm(
        total=spec.inputs,
        initial=skipped,
        unit="img",
        disable=not progress,
        desc=f"scoring ({engine.model} v{engine.version})",
        smoothing=0.1,
    )
    try:
        rows_iter = engine.score(todo)
        for shard in pending:
            size = min(spec.inputs, (shard + 1) * spec.shard_size) - shard * spec.shard_size
            rows: list[Row] = []
            for _ in range(size):
                row = next(rows_iter, None)
                if row is None:
                    raise JobError(
                        f"the {type(engine).__name__} returned fewer rows than "
                        "inputs; the output so far is kept, rerun to resume"
                    )
                rows.append(row)
                errors += row.error is not None
                bar.update(1)
            expected = paths[shard * spec.shard_size : shard * spec.shard_size + size]
            if [r.path for r in rows] != expected:
                raise JobError(f"engine returned rows out of order in shard {shard}")
            store.write(shard, rows)
            scored += size
            bar.set_postfix(errors=errors)
            store.write_manifest({**manifest, "completed": completed_ranges(store, spec)})
    finally:
        bar.close()
    store.assemble(shards)
    store.write_manifest(
        {**manifest, "status": "complete", "completed": completed_ranges(store, spec)}
    )
    return Summary(
        inputs=spec.inputs,
        scored=scored,
        skipped=skipped,
        errors=errors,
        seconds=time.perf_counter() - started,
        output=str(dest),
    )
