"""``python -m bench report``: the in-process limit, our server and the Triton peer, in one run.

Measurements are interleaved — limit, then for each concurrency ours over classifier.v1,
ours over the Open Inference Protocol and the peer back to back, then batched requests,
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

from bench.limit import LimitResult, measure_limit
from bench.load import LoadResult, run_load
from bench.oip_load import ours as our_oip_target
from bench.oip_load import pytriton_peer, run_oip_load
from bench.processes import PeerProcess, ServerProcess, peak_rss_mb
from bench.workload import SCRATCH, latest_model, load_folder, photo_folder, resnet50_model
from service import eventloop
from service.config import build_parser, load_settings, parse_flag_values

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
        "cores": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "avx512_vnni": "avx512_vnni" in flags,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
    }


def _load(
    server: ServerProcess,
    images: list[bytes],
    model: str,
    concurrency: int,
    seconds: float,
    images_per_request: int = 1,
) -> LoadResult:
    return eventloop.run(
        run_load(
            server.target,
            images,
            model=model,
            concurrency=concurrency,
            seconds=seconds,
            warmup=3.0,
            images_per_request=images_per_request,
        )
    )


def _oip(target: Any, images: list[bytes], concurrency: int, seconds: float) -> LoadResult:
    return eventloop.run(
        run_oip_load(target, images, concurrency=concurrency, seconds=seconds, warmup=3.0)
    )


def _torch_eager(checkpoint: Path, images: list[bytes], seconds: float) -> dict[str, float]:
    """What a user would do instead: the checkpoint in PyTorch, eager, on the same photos."""
    import io

    import torch
    from PIL import Image

    from training.checkpoint import model_from_checkpoint
    from training.models import InputNormalize
    from training.presets import eval_transform

    loaded = model_from_checkpoint(checkpoint)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
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
    photos = photo_folder()
    images = load_folder(photos)
    model_path = latest_model(args.repository, "demo") if args.case == "demo" else resnet50_model()
    name = model_path.parent.parent.name
    repository = model_path.parent.parent.parent
    flags = ["--models", name, *args.server_flag]
    # The limit runs with exactly the server's settings (threads, limits).
    settings = load_settings(**parse_flag_values(build_parser().parse_args(args.server_flag)))
    report: dict[str, Any] = {
        "date": date.today().isoformat(),
        "case": args.case,
        "model": str(model_path),
        "machine": machine(),
        "seconds_per_measurement": args.seconds,
        "server_flags": args.server_flag,
        "photos": sorted(os.listdir(photos)),
    }
    print(f"machine: {report['machine']}")
    server = ServerProcess(repository, *flags)
    peer: PeerProcess | None = None
    try:
        server.wait_for_event("serving", timeout=300)
        if not args.no_peer and (args.peer_venv / "bin" / "python").exists():
            SCRATCH.mkdir(parents=True, exist_ok=True)
            peer = PeerProcess(PEER_DIR, args.peer_venv, model_path, SCRATCH / "peer.log")
            peer.wait_ready()
        elif not args.no_peer:
            print(
                f"no Triton peer: {args.peer_venv} missing (run {PEER_DIR}/setup.sh "
                f"{args.peer_venv})"
            )

        limits: list[LimitResult] = [
            measure_limit(model_path, images, seconds=args.seconds / 3, settings=settings)
        ]
        print(limits[0].summary())
        ours: dict[int, LoadResult] = {}
        ours_oip: dict[int, LoadResult] = {}
        theirs: dict[int, LoadResult] = {}
        for c in concurrencies:
            ours[c] = _load(server, images, name, c, args.seconds)
            print(f"ours  classifier.v1 {ours[c].summary()}")
            ours_oip[c] = _oip(our_oip_target(server.target, name), images, c, args.seconds)
            print(f"ours  OIP           {ours_oip[c].summary()}")
            if peer is not None:
                theirs[c] = _oip(pytriton_peer(f"127.0.0.1:{peer.port}"), images, c, args.seconds)
                print(f"peer  OIP           {theirs[c].summary()}")
        batched = {
            n: _load(server, images, name, 4, args.seconds, images_per_request=n) for n in (8, 16)
        }
        for result in batched.values():
            print(f"ours  {result.summary()}")
        limits.append(
            measure_limit(model_path, images, seconds=args.seconds / 3, settings=settings)
        )
        print(limits[1].summary())
        report["server_peak_rss_mb"] = round(peak_rss_mb(server.pid), 1)
        if peer is not None:
            report["peer_rss_mb"] = round(peer.rss_mb(), 1)
    finally:
        server.kill()
        if peer is not None:
            peer.stop()
    if args.torch and args.case == "demo" and Path("runs/demo/best.pt").is_file():
        report["torch_eager"] = _torch_eager(Path("runs/demo/best.pt"), images, args.seconds)

    limit_ips = sum(x.best_images_per_s for x in limits) / len(limits)
    limit_b1 = sum(x.batch1_latency_ms["p50"] for x in limits) / len(limits)
    best_ours = max(
        [r.images_per_s for r in ours.values()] + [r.images_per_s for r in batched.values()]
    )
    best_single = max(r.images_per_s for r in ours.values())
    report.update(
        {
            "limit": [x.as_dict() for x in limits],
            "ours": {c: vars(r) for c, r in ours.items()},
            "ours_oip": {c: vars(r) for c, r in ours_oip.items()},
            "ours_batched_requests": {n: vars(r) for n, r in batched.items()},
            "peer": {c: vars(r) for c, r in theirs.items()},
            "ratios": {
                "ours_best_over_limit": round(best_ours / limit_ips, 3),
                "ours_single_image_requests_over_limit": round(best_single / limit_ips, 3),
                "ours_oip_over_peer_by_concurrency": {
                    c: round(ours_oip[c].images_per_s / theirs[c].images_per_s, 3)
                    for c in theirs
                    if theirs[c].images_per_s
                },
                "ours_oip_over_classify_by_concurrency": {
                    c: round(ours_oip[c].images_per_s / ours[c].images_per_s, 3)
                    for c in ours
                    if ours[c].images_per_s
                },
                "batch1_p50_ms_ours_minus_limit": round(
                    ours[min(ours)].latency_ms["p50"] - limit_b1, 3
                )
                if 1 in ours
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
        f"{report['seconds_per_measurement']} s per measurement after 3 s warm-up; server "
        f"flags: {' '.join(report['server_flags']) or 'defaults'}.",
        "",
        "| | images/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for i, x in enumerate(limit):
        lines.append(
            f"| in-process limit ({'first' if i == 0 else 'last'}), best batch "
            f"{x['best_batch']} | {x['best_images_per_s']:.0f} | "
            f"{x['batch1_latency_ms']['p50']:.2f} (batch 1) | "
            f"{x['batch1_latency_ms']['p99']:.2f} (batch 1) |"
        )
    lines += [
        "",
        "One image per request. classifier.v1 through our raw-stub load generator; ours over",
        "OIP and Triton through the same tritonclient (gRPC, BYTES JPEG).",
        "",
        "| concurrency | classifier.v1 img/s (p50, p99 ms) | ours OIP img/s (p50, p99) |"
        " Triton OIP img/s (p50, p99) | ours OIP / Triton |",
        "|---|---|---|---|---|",
    ]

    def cell(o: dict[str, Any] | None) -> str:
        if not o:
            return "–"
        lat = o["latency_ms"]
        return f"{o['images_per_s']:.0f} ({lat.get('p50', 0):.2f}, {lat.get('p99', 0):.2f})"

    def of(table: dict[Any, Any], c: Any) -> dict[str, Any] | None:
        return table.get(c) or table.get(str(c))  # type: ignore[no-any-return]

    for c, o in report["ours"].items():
        oip, peer = of(report.get("ours_oip", {}), c), of(report["peer"], c)
        ratio = (
            f"{oip['images_per_s'] / peer['images_per_s']:.2f}"
            if oip and peer and peer["images_per_s"]
            else "–"
        )
        lines.append(f"| {c} | {cell(o)} | {cell(oip)} | {cell(peer)} | {ratio} |")
    lines += [
        "",
        "Batched requests (ours, 4 callers):",
        "",
        "| images/request | img/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for n, o in report["ours_batched_requests"].items():
        lines.append(
            f"| {n} | {o['images_per_s']:.0f} | {o['latency_ms']['p50']:.2f} | "
            f"{o['latency_ms']['p99']:.2f} |"
        )
    lines += [
        "",
        "Ratios (within this run):",
        "",
        f"- ours / limit (best of all runs): **{r['ours_best_over_limit']}**",
        f"- ours / limit (one image per request): {r['ours_single_image_requests_over_limit']}",
        f"- ours over OIP / Triton by concurrency (same client): "
        f"{r['ours_oip_over_peer_by_concurrency']}",
        f"- ours over OIP / ours over classifier.v1: {r['ours_oip_over_classify_by_concurrency']}",
        f"- batch-1 p50, ours minus limit: {r['batch1_p50_ms_ours_minus_limit']} ms",
        f"- server peak RSS: {report.get('server_peak_rss_mb')} MB; Triton peer RSS "
        f"(all processes): {report.get('peer_rss_mb', '–')} MB",
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
