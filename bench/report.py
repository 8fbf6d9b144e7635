"""``python -m bench report``: the in-process limit, our server and the Triton peer, in one run.

Measurements are interleaved — limit, then for each concurrency ours over classifier.v1,
the gRPC floor (``bench.floor``: a server that does no work), ours over the Open Inference
Protocol and the peer back to back, then batched requests,
then the limit again — so drift of this noisy machine hits every contender alike, and
ratios are taken within the run. Everyone gets the same ONNX model and the same four
photos (JPEG q90, native size); ours over OIP and the peer are driven by one and the same
client (tritonclient, ``bench.oip_load``). Results go to
``bench/results/<date>-<case>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any

from bench.floor import FloorProcess
from bench.limit import LimitResult, measure_limit
from bench.load import LoadResult, run_load
from bench.oip_load import ours as our_oip_target
from bench.oip_load import pytriton_peer, run_oip_load
from bench.processes import (
    PeerProcess,
    ServerProcess,
    peak_rss_mb,
    process_tree,
    rss_mb,
    tree_cpu_seconds,
)
from bench.workload import SCRATCH, latest_model, load_folder, photo_folder, resnet50_model
from service.model.cores import cpu_count
from service.server import eventloop
from service.server.config_loading import build_parser, load_settings, parse_flag_values

PEER_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "peers" / "pytriton"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    import onnxruntime

    return {
        "cores": cpu_count(),
        "cpu": cpu,
        "avx512_vnni": "avx512_vnni" in flags,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
    }


def _load(
    server: ServerProcess | FloorProcess,  # anything with a target and a pid
    images: list[bytes],
    model: str,
    concurrency: int,
    seconds: float,
    warmup: float,
    images_per_request: int = 1,
    channels: int = 4,
) -> LoadResult:
    return eventloop.run(
        run_load(
            server.target,
            images,
            model=model,
            concurrency=concurrency,
            seconds=seconds,
            warmup=warmup,
            images_per_request=images_per_request,
            channels=channels,
            cpu_probe=lambda: tree_cpu_seconds(server.pid),
        )
    )


def _oip(
    target: Any, images: list[bytes], concurrency: int, seconds: float, warmup: float, pid: int
) -> LoadResult:
    return eventloop.run(
        run_oip_load(
            target,
            images,
            concurrency=concurrency,
            seconds=seconds,
            warmup=warmup,
            cpu_probe=lambda: tree_cpu_seconds(pid),
        )
    )


def _worker_counts(spec: str) -> list[int]:
    """ "1,auto" → [1, cores]: the worker counts to measure, in order, without repeats."""
    cores = cpu_count()
    counts = [cores if part.strip() == "auto" else int(part) for part in spec.split(",")]
    return list(dict.fromkeys(counts))


def _rss(server: ServerProcess) -> dict[str, Any]:
    """RSS of the supervisor (when there are workers) and of each serving process."""
    tree = process_tree(server.pid)
    if len(tree) == 1:
        return {"processes": 1, "serving_mb": [round(rss_mb(server.pid), 1)]}
    return {
        "processes": len(tree),
        "supervisor_mb": round(rss_mb(server.pid), 1),
        "serving_mb": [round(rss_mb(p), 1) for p in tree[1:]],
    }


def _torch_eager(checkpoint: Path, images: list[bytes], seconds: float) -> dict[str, float]:
    """What a user would do instead: the checkpoint in PyTorch, eager, on the same photos."""
    import io

    import torch
    from PIL import Image

    from training.checkpoint import model_from_checkpoint
    from training.models import InputNormalize
    from training.presets import eval_transform

    loaded = model_from_checkpoint(checkpoint)
    torch.set_num_threads(cpu_count())
    h, w = loaded.input_size
    transform = eval_transform(loaded.preprocessing, h, w)
    normalize = InputNormalize(loaded.preprocessing.mean, loaded.preprocessing.std)
    model = loaded.model.eval()
    count, started = 0, time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - started < seconds:
            batch = torch.stack(
                [
                    transform(Image.open(io.BytesIO(images[i % len(images)])).convert("RGB"))
                    for i in range(32)
                ]
            )
            logits = model(normalize(batch))[0]
            torch.softmax(logits, dim=1).topk(5)
            count += 32
    return {"images_per_s": count / (time.perf_counter() - started), "batch": 32}


def run_report(args: argparse.Namespace) -> dict[str, Any]:
    concurrencies = [int(c) for c in str(args.concurrency).split(",")]
    workers = _worker_counts(args.workers)
    main_workers = workers[-1]  # OIP, batched requests and the Triton comparison use this one
    photos = photo_folder()
    images = load_folder(photos)
    model_path = latest_model(args.repository, "demo") if args.case == "demo" else resnet50_model()
    name = model_path.parent.parent.name
    repository = model_path.parent.parent.parent
    flags = ["--models", name, *args.server_flag]
    # The limit runs with exactly the server's settings (threads, limits).
    settings = load_settings(**parse_flag_values(build_parser().parse_args(args.server_flag)))
    warmup = args.warmup
    report: dict[str, Any] = {
        "date": date.today().isoformat(),
        "case": args.case,
        "model": str(model_path),
        "machine": machine(),
        "seconds_per_measurement": args.seconds,
        "warmup_seconds": warmup,
        "server_flags": args.server_flag,
        "workers": workers,
        "channels": args.channels,
        "photos": sorted(os.listdir(photos)),
    }
    print(f"machine: {report['machine']}")
    floor = FloorProcess()  # ends with this process, whatever happens (see bench.floor)
    # One server per worker count, all started up front (an idle one costs nothing), so
    # their measurements can be interleaved with the others'.
    servers = {w: ServerProcess(repository, *flags, "--workers", str(w)) for w in workers}
    peer: PeerProcess | None = None
    try:
        for server in servers.values():
            server.wait_for_event("serving", timeout=300)
        peer_venv_ready = (args.peer_venv / "bin" / "python").exists()
        peer_dir = args.peer_dir or PEER_DIR
        peer_scripts = (peer_dir / "serve.sh").is_file()
        if not args.no_peer and peer_venv_ready and peer_scripts:
            SCRATCH.mkdir(parents=True, exist_ok=True)
            peer = PeerProcess(peer_dir, args.peer_venv, model_path, SCRATCH / "peer.log")
            peer.wait_ready()
        elif not args.no_peer:
            # The report still compares our server with the in-process limit without it.
            missing = args.peer_venv if not peer_venv_ready else peer_dir / "serve.sh"
            print(f"no Triton peer: {missing} missing (run {peer_dir}/setup.sh {args.peer_venv})")

        def limit() -> LimitResult:
            result = measure_limit(model_path, images, seconds=args.seconds / 3, settings=settings)
            print(result.summary())
            return result

        limits = [limit()]
        floor_results: dict[int, LoadResult] = {}
        ours: dict[int, dict[int, LoadResult]] = {w: {} for w in workers}
        ours_oip: dict[int, LoadResult] = {}
        theirs: dict[int, LoadResult] = {}
        for c in concurrencies:
            for w, server in servers.items():
                ours[w][c] = _load(server, images, name, c, args.seconds, warmup, 1, args.channels)
                print(f"ours  classifier.v1 workers={w} {ours[w][c].summary()}")
            floor_results[c] = _load(floor, images, name, c, args.seconds, warmup, 1, args.channels)
            print(f"gRPC floor (no work)           {floor_results[c].summary()}")
            served = servers[main_workers]
            oip_target = our_oip_target(served.target, name)
            ours_oip[c] = _oip(oip_target, images, c, args.seconds, warmup, served.pid)
            print(f"ours  OIP           workers={main_workers} {ours_oip[c].summary()}")
            if peer is not None:
                peer_target = pytriton_peer(f"127.0.0.1:{peer.port}")
                theirs[c] = _oip(peer_target, images, c, args.seconds, warmup, peer.process.pid)
                print(f"peer  OIP           {theirs[c].summary()}")
        # A client with one connection reaches one worker: no gain, and no loss either.
        top = max(concurrencies)
        single_channel = {}
        for w, server in servers.items():
            single_channel[w] = _load(server, images, name, top, args.seconds, warmup, 1, 1)
            print(f"ours  classifier.v1 workers={w} channels=1 {single_channel[w].summary()}")
        batched = {
            n: _load(servers[main_workers], images, name, 4, args.seconds, warmup, n, args.channels)
            for n in (8, 16)
        }
        for result in batched.values():
            print(f"ours  {result.summary()}")
        limits.append(limit())
        report["server_peak_rss_mb"] = round(peak_rss_mb(servers[main_workers].pid), 1)
        report["server_rss_by_workers"] = {w: _rss(s) for w, s in servers.items()}
        if peer is not None:
            report["peer_rss_mb"] = round(peer.rss_mb(), 1)
    finally:
        for server in servers.values():
            server.kill()
        floor.stop()
        if peer is not None:
            peer.stop()
    if args.torch and args.case == "demo" and Path("runs/demo/best.pt").is_file():
        report["torch_eager"] = _torch_eager(Path("runs/demo/best.pt"), images, args.seconds)

    main = ours[main_workers]
    limit_ips = sum(x.best_images_per_s for x in limits) / len(limits)
    limit_cpu = sum(x.cpu_ms_per_image for x in limits) / len(limits)
    limit_b1 = sum(x.batch1_latency_ms["p50"] for x in limits) / len(limits)
    best_ours = max(
        [r.images_per_s for r in main.values()] + [r.images_per_s for r in batched.values()]
    )
    best_single = max(r.images_per_s for r in main.values())

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    report.update(
        {
            "limit": [x.as_dict() for x in limits],
            "ours": {c: vars(r) for c, r in main.items()},
            "ours_by_workers": {
                w: {c: vars(r) for c, r in by_c.items()} for w, by_c in ours.items()
            },
            "ours_single_channel": {w: vars(r) for w, r in single_channel.items()},
            "ours_oip": {c: vars(r) for c, r in ours_oip.items()},
            "ours_batched_requests": {n: vars(r) for n, r in batched.items()},
            "peer": {c: vars(r) for c, r in theirs.items()},
            "grpc_floor": {c: vars(r) for c, r in floor_results.items()},
            "ratios": {
                # The limit plus the gRPC floor over the limit: the CPU ratio below which
                # no grpcio server can go here, however little its handlers do.
                "best_possible_cpu_per_image_over_limit": {
                    c: ratio(limit_cpu + r.cpu_ms_per_image, limit_cpu)
                    for c, r in floor_results.items()
                    if r.cpu_ms_per_image is not None
                },
                "ours_best_over_limit": round(best_ours / limit_ips, 3),
                "ours_single_image_requests_over_limit": round(best_single / limit_ips, 3),
                "cpu_per_image_over_limit_by_workers": {
                    w: {c: ratio(r.cpu_ms_per_image, limit_cpu) for c, r in by_c.items()}
                    for w, by_c in ours.items()
                },
                "ours_over_peer_by_concurrency": {
                    c: ratio(main[c].images_per_s, theirs[c].images_per_s) for c in theirs
                },
                "ours_oip_over_peer_by_concurrency": {
                    c: ratio(ours_oip[c].images_per_s, theirs[c].images_per_s) for c in theirs
                },
                "ours_oip_over_classify_by_concurrency": {
                    c: ratio(ours_oip[c].images_per_s, main[c].images_per_s) for c in main
                },
                f"workers_{main_workers}_over_1_at_c{top}": ratio(
                    main[top].images_per_s, ours[1][top].images_per_s
                )
                if 1 in ours
                else None,
                f"workers_{main_workers}_over_1_at_c{top}_one_channel": ratio(
                    single_channel[main_workers].images_per_s, single_channel[1].images_per_s
                )
                if 1 in single_channel
                else None,
                "batch1_p50_ms_ours_minus_limit": round(main[1].latency_ms["p50"] - limit_b1, 3)
                if 1 in main
                else None,
            },
        }
    )
    write_outputs(report, args.results)
    return report


def write_outputs(report: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{report['date']}-{report['case']}"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    Path(f"{stem}.md").write_text(markdown(report))
    plot(report, Path(f"{stem}.png"))
    print(f"wrote {stem}.json, .md, .png")


def markdown(report: dict[str, Any]) -> str:
    m, r = report["machine"], report["ratios"]
    limit = report["limit"]
    lines = [
        f"# Benchmark: {report['case']} ({report['date']})",
        "",
        f"Machine: {m['cores']} cores, {m['cpu']} (AVX512-VNNI: {m['avx512_vnni']}), "
        f"Python {m['python']}, ONNX Runtime {m['onnxruntime']}. Model `{report['model']}`; "
        f"photos {', '.join(report['photos'])} (JPEG q90, native size); "
        f"{report['seconds_per_measurement']} s per measurement after "
        f"{report.get('warmup_seconds', 3.0)} s warm-up; server flags: "
        f"{' '.join(report['server_flags']) or 'defaults'}; our clients use "
        f"{report.get('channels', 4)} connections. CPU ms per image: the server's whole "
        "process tree (supervisor and workers, from /proc) over the measured window; the "
        "limit's own process.",
        "",
        "| | images/s | CPU ms/img | batch-1 p50 ms | batch-1 p99 ms |",
        "|---|---|---|---|---|",
    ]
    for i, x in enumerate(limit):
        lines.append(
            f"| in-process limit ({'first' if i == 0 else 'last'}), best batch "
            f"{x['best_batch']} | {x['best_images_per_s']:.0f} | "
            f"{x.get('cpu_ms_per_image', float('nan')):.2f} | "
            f"{x['batch1_latency_ms']['p50']:.2f} | {x['batch1_latency_ms']['p99']:.2f} |"
        )

    def cpu(o: dict[str, Any] | None) -> str:
        value = (o or {}).get("cpu_ms_per_image")
        return "–" if value is None else f"{value:.2f}"

    def cell(o: dict[str, Any] | None) -> str:
        if not o:
            return "–"
        lat = o["latency_ms"]
        return f"{o['images_per_s']:.0f} ({lat.get('p50', 0):.2f}, {lat.get('p99', 0):.2f})"

    def of(table: dict[Any, Any], c: Any) -> dict[str, Any] | None:
        return table.get(c) or table.get(str(c))  # type: ignore[no-any-return]

    by_workers = report.get("ours_by_workers") or {"?": report["ours"]}
    lines += [
        "",
        "One image per request, classifier.v1 through our raw-stub load generator, by the",
        "server's worker count: img/s (p50, p99 ms), CPU ms per image, and that CPU over",
        "the limit's.",
        "",
        "| concurrency | "
        + " | ".join(f"{w} worker(s) img/s (p50, p99) | CPU ms/img | ÷ limit" for w in by_workers)
        + " |",
        "|---|" + "---|---|---|" * len(by_workers),
    ]
    cpu_ratios = r.get("cpu_per_image_over_limit_by_workers", {})
    for c in report["ours"]:
        cells = []
        for w, table in by_workers.items():
            o = of(table, c)
            over = of(of(cpu_ratios, w) or {}, c)
            cells += [cell(o), cpu(o), "–" if over is None else f"{over:.2f}"]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    busy = [
        f"{w} worker(s) c={c}: {o['machine_busy_percent']:.0f}%"
        for w, table in by_workers.items()
        for c, o in table.items()
        if o.get("machine_busy_percent") is not None
    ]
    if busy:
        lines += [
            "",
            "How busy the whole machine was (every core, the load generator included): "
            + "; ".join(busy)
            + ". Near 100%, more workers can only take CPU from the client.",
        ]
    floor = report.get("grpc_floor", {})
    if floor:
        lines += [
            "",
            "The gRPC floor: a grpc.aio server on uvloop that answers every Classify at once "
            "(no decode, no model; `bench/floor.py`), driven by the same client: CPU ms per "
            "call "
            + ", ".join(f"{cpu(o)} at c={c}" for c, o in floor.items())
            + ". No handler can go below the limit plus this.",
        ]
    single = report.get("ours_single_channel", {})
    if single:
        lines += [
            "",
            "A client with one connection (it reaches one worker): "
            + "; ".join(f"{w} worker(s) {cell(o)}" for w, o in single.items()),
        ]
    lines += [
        "",
        f"Ours over OIP ({report.get('workers', ['?'])[-1]} worker(s)) and Triton, through the "
        "same tritonclient (gRPC, one BYTES JPEG per request):",
        "",
        "| concurrency | ours OIP img/s (p50, p99) | CPU ms/img | Triton img/s (p50, p99) |"
        " CPU ms/img | ours OIP / Triton |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["ours"]:
        oip, peer = of(report.get("ours_oip", {}), c), of(report["peer"], c)
        ratio = (
            f"{oip['images_per_s'] / peer['images_per_s']:.2f}"
            if oip and peer and peer["images_per_s"]
            else "–"
        )
        lines.append(f"| {c} | {cell(oip)} | {cpu(oip)} | {cell(peer)} | {cpu(peer)} | {ratio} |")
    lines += [
        "",
        "Batched requests (ours, 4 callers):",
        "",
        "| images/request | img/s | p50 ms | p99 ms | CPU ms/img |",
        "|---|---|---|---|---|",
    ]
    for n, o in report["ours_batched_requests"].items():
        lines.append(
            f"| {n} | {o['images_per_s']:.0f} | {o['latency_ms']['p50']:.2f} | "
            f"{o['latency_ms']['p99']:.2f} | {cpu(o)} |"
        )
    rss = report.get("server_rss_by_workers", {})
    lines += ["", "Ratios (within this run):", ""]
    lines += [f"- {key}: **{value}**" for key, value in r.items()]
    lines += [
        f"- server peak RSS: {report.get('server_peak_rss_mb')} MB; by worker count: "
        + (
            "; ".join(
                f"{w}: serving processes {x['serving_mb']} MB"
                + (f", supervisor {x['supervisor_mb']} MB" if "supervisor_mb" in x else "")
                for w, x in rss.items()
            )
            or "–"
        )
        + f"; Triton peer RSS (all processes): {report.get('peer_rss_mb', '–')} MB",
    ]
    if "torch_eager" in report:
        lines.append(
            f"- PyTorch eager on the checkpoint (batch 32): "
            f"{report['torch_eager']['images_per_s']:.0f} img/s"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ours = report["ours"]
    ax.plot(
        [o["images_per_s"] for o in ours.values()],
        [o["latency_ms"]["p99"] for o in ours.values()],
        "o-",
        label="ours (classifier.v1)",
    )
    for c, o in ours.items():
        ax.annotate(f"c={c}", (o["images_per_s"], o["latency_ms"]["p99"]), fontsize=7)
    if report.get("ours_oip"):
        oip = report["ours_oip"]
        ax.plot(
            [o["images_per_s"] for o in oip.values()],
            [o["latency_ms"]["p99"] for o in oip.values()],
            "^-",
            label="ours (OIP, tritonclient)",
        )
    if report["peer"]:
        peer = report["peer"]
        ax.plot(
            [p["images_per_s"] for p in peer.values()],
            [p["latency_ms"]["p99"] for p in peer.values()],
            "s--",
            label="Triton (PyTriton, tritonclient)",
        )
    limit = sum(x["best_images_per_s"] for x in report["limit"]) / len(report["limit"])
    ax.axvline(limit, color="grey", linestyle=":", label="in-process limit")
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{report['case']}: one image per request, {report['machine']['cores']} cores")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
