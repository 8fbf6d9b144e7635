"""``python -m bench features``: what the operator features cost, and whether the traffic
split holds, in one interleaved run on the demo model:

* ModelStreamInfer against unary ModelInfer (tritonclient, the same server), and
  classifier.v1's Stream against its unary Classify (raw stubs): img/s and server CPU ms
  per image, each caller closed-loop with one request outstanding;
* tracing on (OTLP/HTTP to a sink in this process, 100% sampling) against off;
* the prediction watch on (the default) against ``--no-prediction-watch``;
* 10,000 classify calls that name no version, under a 90/10 split between two versions,
  over several connections (so both workers apply the split): the shares answered.
* with ``--baseline CHECKOUT``, the same unary calls on the server of an earlier commit's
  checkout (a before/after comparison of a change to the request path).

Every variant runs on its own server (started up front, the same worker count), and the
measurements go round-robin — each round measures every variant at each concurrency, each
round starting one variant later — so the drift of a noisy machine and the place in the
order hit them alike; ratios are taken within the run. Results go
to ``bench/results/<date>-features.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.load import LoadResult, run_load
from bench.oip_load import ours, run_oip_load
from bench.processes import ROOT, ServerProcess, tree_cpu_seconds
from bench.workload import latest_model, load_folder, photo_folder
from service.client import ClassifierClient
from service.model.cores import cpu_count
from service.server import eventloop

RESULTS = Path("bench/results")


class SpanSink:
    """An OTLP/HTTP endpoint that takes spans and drops them (a collector's receive cost
    is the collector's, not the server's)."""

    def __init__(self) -> None:
        self.requests = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}/v1/traces"


def measure(
    server: ServerProcess,
    images: list[bytes],
    concurrency: int,
    seconds: float,
    protocol: str,
    stream: bool,
) -> LoadResult:
    """Closed-loop load over the OIP (tritonclient) or classifier.v1 (raw stub)."""
    probe = lambda: tree_cpu_seconds(server.pid)  # noqa: E731
    if protocol == "classifier":
        return eventloop.run(
            run_load(
                server.target,
                images,
                model="demo",
                concurrency=concurrency,
                seconds=seconds,
                warmup=1.5,
                cpu_probe=probe,
                stream=stream,
            )
        )
    return eventloop.run(
        run_oip_load(
            ours(server.target, "demo"),
            images,
            concurrency=concurrency,
            seconds=seconds,
            warmup=1.5,
            cpu_probe=probe,
            stream=stream,
        )
    )


def traffic_split(model: Path, workers: int, calls: int) -> dict[str, Any]:
    """``calls`` classify calls naming no version under a 90/10 split of two versions."""
    repository = Path(tempfile.mkdtemp(prefix="bench-split-"))
    try:
        for version in (1, 2):
            (repository / "demo" / str(version)).mkdir(parents=True)
            shutil.copy(model, repository / "demo" / str(version) / "model.onnx")
        weights = json.dumps({"demo": {"1": 90, "2": 10}})
        server = ServerProcess(
            repository, "--version-policy", "all", "--version-weights", weights, workers=workers
        )
        try:
            server.wait_for_event("serving", timeout=120)
            image = load_folder(photo_folder())[0]
            with ClassifierClient(server.target, channels=4) as client:
                client.classify([image], model="demo")  # every worker serving

                def one(_: int) -> str:
                    return client.classify([image], model="demo")[0].version

                with ThreadPoolExecutor(8) as pool:
                    answered = Counter(pool.map(one, range(calls)))
        finally:
            server.kill()
    finally:
        shutil.rmtree(repository, ignore_errors=True)
    share = answered["2"] / calls
    sigma = (0.1 * 0.9 / calls) ** 0.5
    return {
        "calls": calls,
        "weights": {"1": 90, "2": 10},
        "answered": dict(sorted(answered.items())),
        "share_of_version_2": round(share, 4),
        "binomial_sigma": round(sigma, 4),
        "deviation_in_sigmas": round((share - 0.1) / sigma, 2),
    }


def _describe(checkout: Path) -> str:
    """The baseline checkout's commit, as ``git describe`` would name it."""
    commit = subprocess.run(
        ["git", "-C", str(checkout), "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{checkout} ({commit[:90] or 'not a git checkout'})"


Variant = tuple[str, str, str, bool]  # (name, server, protocol, stream)
VARIANTS: list[Variant] = [
    ("unary", "base", "oip", False),
    ("stream", "base", "oip", True),
    ("v1_unary", "base", "classifier", False),
    ("v1_stream", "base", "classifier", True),
    ("tracing_on", "traced", "oip", False),
    ("prediction_watch_off", "no_watch", "oip", False),
]
BASELINE_VARIANTS: list[Variant] = [
    ("baseline_unary", "baseline", "oip", False),
    ("v1_baseline_unary", "baseline", "classifier", False),
]


def choose_variants(baseline: bool, names: str | None) -> list[Variant]:
    """The variants to measure, in order: all (the baseline's with ``--baseline``), or the
    comma-separated ``names``."""
    known = VARIANTS + (BASELINE_VARIANTS if baseline else [])
    if not names:
        return known
    chosen = set(names.split(","))
    unknown = chosen - {name for name, _, _, _ in known}
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)} (without --baseline: no baseline_*)")
    return [v for v in known if v[0] in chosen]


def in_round(variants: list[Variant], round_: int) -> list[Variant]:
    """Round ``round_``'s order: each round starts one variant later. A fixed order favoured
    the last variants (an A/A run, the same code on two servers, read 0.85x CPU for the
    one measured last), so every variant takes every place in turn."""
    shift = round_ % len(variants)
    return variants[shift:] + variants[:shift]


def run_features(args: argparse.Namespace) -> dict[str, Any]:
    model = latest_model(args.repository, "demo")
    repository = model.parent.parent.parent
    images = load_folder(photo_folder())
    workers = args.workers or cpu_count()
    flags = ["--models", "demo", "--workers", str(workers)]
    sink = SpanSink()
    traced_env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink.endpoint,
        "OTEL_TRACES_SAMPLER": "always_on",
    }
    # name: (extra flags, environment, checkout); started only if a chosen variant uses it
    server_specs: dict[str, tuple[list[str], dict[str, str], Path]] = {
        "base": ([], {}, ROOT),
        "traced": ([], traced_env, ROOT),
        "no_watch": (["--no-prediction-watch"], {}, ROOT),
    }
    if args.baseline:
        server_specs["baseline"] = ([], {}, args.baseline.resolve())
    variants = choose_variants(bool(args.baseline), args.variants)
    concurrencies = [int(c) for c in str(args.concurrency).split(",")]
    runs: dict[str, dict[int, list[LoadResult]]] = {
        name: {c: [] for c in concurrencies} for name, _, _, _ in variants
    }
    servers: dict[str, ServerProcess] = {}
    try:
        # One at a time inside the try: a start that fails or is interrupted still stops
        # the servers started before it.
        for name, (extra, env, root) in server_specs.items():
            if any(server == name for _, server, _, _ in variants):
                servers[name] = ServerProcess(
                    repository, *flags, *extra, env=env, workers=None, root=root
                )
        for server in servers.values():
            server.wait_for_event("serving", timeout=300)
        for round_ in range(args.rounds):
            for c in concurrencies:
                for name, server_name, protocol, stream in in_round(variants, round_):
                    server = servers[server_name]
                    result = measure(server, images, c, args.seconds, protocol, stream)
                    runs[name][c].append(result)
                    print(
                        f"round {round_ + 1} c={c} {name}: {result.images_per_s:.1f} img/s, "
                        f"{result.cpu_ms_per_image or 0:.3f} CPU ms/img, errors {result.errors}",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.kill()
        sink.server.shutdown()
    report: dict[str, Any] = {
        "date": date.today().isoformat(),
        "model": str(model),
        "workers": workers,
        "rounds": args.rounds,
        "seconds_per_measurement": args.seconds,
        "spans_posted": sink.requests,
        "baseline": _describe(args.baseline) if args.baseline else None,
        "results": {
            name: {
                str(c): {
                    "images_per_s": round(statistics.median(r.images_per_s for r in rs), 1),
                    "cpu_ms_per_image": round(
                        statistics.median(r.cpu_ms_per_image or 0.0 for r in rs), 3
                    ),
                    "p50_ms": round(statistics.median(r.latency_ms["p50"] for r in rs), 2),
                    "errors": sum(sum(r.errors.values()) for r in rs),
                }
                for c, rs in by_c.items()
            }
            for name, by_c in runs.items()
        },
    }
    if args.split_calls:
        report["traffic_split"] = traffic_split(model, workers, args.split_calls)
    return report


def markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    lines = [
        f"# Operator features, {report['date']} ({report['workers']} workers, "
        f"{report['rounds']} interleaved rounds of {report['seconds_per_measurement']} s; medians)",
        "",
        "| variant | c | img/s | vs unary | CPU ms/img | vs unary | p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_c in report["results"].items():
        for c, r in by_c.items():
            # Each variant against the unary calls of its own protocol.
            ref = results.get("v1_unary" if name.startswith("v1_") else "unary", {}).get(c)
            speed = f"{r['images_per_s'] / ref['images_per_s']:.3f}" if ref else "-"
            cpu = f"{r['cpu_ms_per_image'] / ref['cpu_ms_per_image']:.3f}" if ref else "-"
            lines.append(
                f"| {name} | {c} | {r['images_per_s']} | {speed} | {r['cpu_ms_per_image']} | "
                f"{cpu} | {r['p50_ms']} |"
            )
    if report.get("baseline"):
        lines += ["", f"Baseline (`--baseline`): {report['baseline']}."]
    split = report.get("traffic_split")
    if split:
        lines += [
            "",
            f"Traffic split 90/10, {split['calls']} calls naming no version: answered "
            f"{split['answered']}, version 2's share {split['share_of_version_2']} "
            f"({split['deviation_in_sigmas']} binomial sigmas from 0.10).",
        ]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    report = run_features(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{report['date']}-features{'-' + args.label if args.label else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
