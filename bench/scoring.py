"""``python -m bench scoring``: batch-scoring throughput of each engine against the limit.

One invocation, interleaved so machine drift hits everyone: the in-process limit on the
same images, then the local engine, the gRPC engine against our server in a subprocess,
the Ray engine (a local Ray), and the local engine once more. Each engine is a real
``python -m service.scoring`` run writing Parquet to a scratch folder; its throughput is
the job's own figure (scoring only: model load and Ray start-up are left out, and the
wall time including them is recorded beside it). Results go to
``bench/results/<date>-scoring-<model>.{json,md}``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

from bench.limit import measure_limit
from bench.processes import ServerProcess
from bench.report import machine
from bench.workload import SCRATCH
from service.model.layout import resolve_model_file
from service.scoring.sources import list_inputs

ENGINES = ("local", "grpc", "ray")
_SUMMARY = re.compile(r"scored (\d+) of (\d+) inputs .*?(\d+) errors, ([\d.]+) img/s")


@dataclass(frozen=True)
class EngineRun:
    engine: str
    scored: int
    errors: int
    images_per_s: float
    wall_seconds: float  # the whole subprocess, start-up included


def run_engine(engine: str, model: str, inputs: str, output: Path, extra: list[str]) -> EngineRun:
    command = [
        sys.executable,
        "-m",
        "service.scoring",
        "--engine",
        engine,
        "--model",
        model,
        "--input",
        inputs,
        "--output",
        str(output),
        "--overwrite",
        "--no-progress",
        *extra,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{engine} engine failed ({done.returncode}):\n{done.stderr[-2000:]}")
    match = _SUMMARY.search(done.stdout)
    if match is None:
        raise RuntimeError(f"no summary line from the {engine} engine:\n{done.stdout[-2000:]}")
    scored, _, errors, ips = match.groups()
    return EngineRun(engine, int(scored), int(errors), float(ips), round(wall, 1))


def run_scoring_bench(
    model_dir: Path,
    inputs: str,
    *,
    engines: tuple[str, ...] = ENGINES,
    limit_images: int = 2000,
    limit_seconds: float = 4.0,
    ray_cpus: int = 2,
    results: Path | None = Path("bench/results"),
    scratch: Path = SCRATCH / "scoring",
) -> dict[str, Any]:
    model_file = resolve_model_file(str(model_dir))
    paths = list_inputs(inputs)
    # The limit decodes from memory: a spread sample of the same inputs, read once.
    step = max(1, len(paths) // limit_images)
    sample = [Path(p).read_bytes() for p in paths[::step][:limit_images]]
    limit = measure_limit(model_file, sample, seconds=limit_seconds)
    print(limit.summary(), file=sys.stderr)

    runs: list[EngineRun] = []
    order = [e for e in ("local", "grpc", "ray") if e in engines]
    if "local" in engines and len(order) > 1:
        order.append("local")  # again at the end: the drift check
    name, version = model_file.parent.parent.name, model_file.parent.name
    for engine in order:
        output = scratch / f"{engine}-{len(runs)}"
        if engine == "grpc":
            repository = model_file.parent.parent.parent.resolve()
            server = ServerProcess(repository, "--models", name)
            try:
                server.wait_for_event("serving")
                extra = ["--target", server.target]
                run = run_engine(engine, f"{name}/{version}", inputs, output, extra)
            finally:
                server.kill()
        elif engine == "ray":
            extra = ["--num-cpus", str(ray_cpus), "--batch-size", "64"]
            run = run_engine(engine, str(model_file.parent), inputs, output, extra)
        else:
            run = run_engine(engine, str(model_file.parent), inputs, output, [])
        print(
            f"{engine}: {run.images_per_s:.1f} img/s ({run.scored} scored, {run.errors} errors, "
            f"{run.wall_seconds} s wall)",
            file=sys.stderr,
        )
        runs.append(run)

    local = [r.images_per_s for r in runs if r.engine == "local"]
    local_mean = sum(local) / len(local) if local else float("nan")
    ratios: dict[str, float] = {}
    if local:
        ratios["local / limit"] = round(local_mean / limit.best_images_per_s, 3)
    for r in runs:
        if r.engine != "local" and local:
            ratios[f"{r.engine} / local"] = round(r.images_per_s / local_mean, 3)
    report = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "model": str(model_file),
        "inputs": inputs,
        "input_count": len(paths),
        "limit": limit.as_dict(),
        "runs": [asdict(r) for r in runs],
        "ratios": ratios,
    }
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        stem = results / f"{report['date']}-scoring-{name}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
        print(f"wrote {stem}.json, .md", file=sys.stderr)
    return report


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Batch scoring: {report['model']} ({report['date']})",
        "",
        f"Machine: {m['cores']} cores, {m['cpu']}. {report['input_count']} inputs from "
        f"`{report['inputs']}`; Parquet output; throughput excludes start-up.",
        "",
        "| run | images/s | scored | errors | wall s (with start-up) |",
        "|---|---|---|---|---|",
        f"| in-process limit, best batch {report['limit']['best_batch']} | "
        f"{report['limit']['best_images_per_s']:.0f} | – | – | – |",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['engine']} engine | {r['images_per_s']:.0f} | {r['scored']} | {r['errors']} "
            f"| {r['wall_seconds']} |"
        )
    lines += ["", "Ratios: " + ", ".join(f"{k} **{v}**" for k, v in report["ratios"].items()), ""]
    return "\n".join(lines)
