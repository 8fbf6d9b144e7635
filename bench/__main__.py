"""``python -m bench``: load, limit and report.

python -m bench load --target localhost:50051 --images bench/scratch/photos -c 8 --seconds 10
python -m bench load --rate 200 --seconds 10            # open loop, Poisson arrivals
python -m bench load --protocol oip --model demo -c 8    # tritonclient, BYTES JPEG
python -m bench load --protocol oip --payload tensor --model demo -c 8  # UINT8, no decode
python -m bench limit --model models/demo/1/model.onnx
python -m bench report [--case demo|resnet50]
python -m bench scoring --model models/demo --input data/demo
python -m bench features            # streaming, tracing, prediction watch; the 90/10 split
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    load = sub.add_parser("load", help="drive a running server (loopback only)")
    load.add_argument("--target", default="localhost:50051")
    load.add_argument("--images", type=Path, help="folder of images (default: the bench photos)")
    load.add_argument("--model", default="")
    load.add_argument("-c", "--concurrency", type=int, default=8, help="closed-loop callers")
    load.add_argument("--rate", type=float, help="open loop: requests/s (Poisson)")
    load.add_argument("--seconds", type=float, default=10.0, help="measured duration")
    load.add_argument("--requests", type=int, help="stop after this many measured requests")
    load.add_argument("--warmup", type=float, default=2.0, help="seconds not measured")
    load.add_argument("--images-per-request", type=int, default=1)
    load.add_argument(
        "--channels", type=int, default=4, help="connections, spread over the server's workers"
    )
    load.add_argument("--method", choices=["classify", "localize"], default="classify")
    load.add_argument(
        "--protocol",
        choices=["classifier", "oip"],
        default="classifier",
        help="classifier.v1 (raw stub) or the Open Inference Protocol (tritonclient; closed "
        "loop, one image per request)",
    )
    load.add_argument(
        "--payload",
        choices=["jpeg", "tensor"],
        default="jpeg",
        help="with --protocol oip: each image as encoded bytes (BYTES), or as a UINT8 tensor "
        "at the model's input size (no decode or resize in the server)",
    )
    load.add_argument("--json", type=Path, help="also write the result here")
    load.add_argument(
        "--latencies", type=Path, help="also write every measured latency (s) here, one per line"
    )

    limit = sub.add_parser("limit", help="the in-process pipeline, no gRPC")
    limit.add_argument("--model", type=Path, required=True, help="model.onnx")
    limit.add_argument("--images", type=Path)
    limit.add_argument("--seconds", type=float, default=5.0, help="per batch size")

    report = sub.add_parser("report", help="limit vs our server vs the Triton peer")
    report.add_argument(
        "--case",
        choices=["demo", "resnet50"],
        default="demo",
        help="demo: the newest models/demo; resnet50: random-init ResNet-50 at 224 px",
    )
    report.add_argument("--repository", type=Path, default=Path("models"))
    report.add_argument(
        "--concurrency", default="1,8,16,32", help="closed-loop callers, comma-separated"
    )
    report.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    report.add_argument("--warmup", type=float, default=3.0, help="seconds before each")
    report.add_argument(
        "--workers",
        default="1,auto",
        help="server worker counts to measure, comma-separated (auto: one per core); the "
        "last one also serves the OIP, batched and Triton comparisons",
    )
    report.add_argument("--channels", type=int, default=4, help="connections per client")
    report.add_argument(
        "--peer-venv",
        type=Path,
        default=Path("/tmp/pytriton-venv"),
        help="the Triton peer's venv (../shared/peers/pytriton/setup.sh); skipped if absent",
    )
    report.add_argument(
        "--peer-dir",
        type=Path,
        default=None,
        help="the Triton peer's scripts (default: ../shared/peers/pytriton beside the project)",
    )
    report.add_argument("--no-peer", action="store_true", help="leave the Triton peer out")
    report.add_argument(
        "--torch", action="store_true", help="also PyTorch eager on the checkpoint (demo case)"
    )
    report.add_argument("--results", type=Path, default=Path("bench/results"))
    report.add_argument(
        "--server-flag",
        action="append",
        default=[],
        help="extra flag for our server and the limit, e.g. --server-flag=--jpeg-draft-factor=1 "
        "(repeatable)",
    )

    features = sub.add_parser(
        "features", help="streaming vs unary, tracing and prediction-watch cost, traffic split"
    )
    features.add_argument("--repository", type=Path, default=Path("models"))
    features.add_argument("--concurrency", default="8,32", help="closed-loop callers")
    features.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    features.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    features.add_argument("--workers", type=int, default=0, help="per server (0: one per core)")
    features.add_argument(
        "--split-calls", type=int, default=10_000, help="calls under the 90/10 split (0: skip)"
    )
    features.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of an earlier commit (its protobuf code generated: python -m "
        "service.protogen there) "
        "whose server is measured beside this one, unary OIP and classifier.v1",
    )
    features.add_argument(
        "--label", default="", help="results go to bench/results/<date>-features-<label>.*"
    )
    features.add_argument(
        "--variants",
        help="comma-separated subset to measure (default: all): unary, stream, v1_unary, "
        "v1_stream, tracing_on, prediction_watch_off, baseline_unary, v1_baseline_unary",
    )

    scoring = sub.add_parser("scoring", help="batch-scoring engines vs the limit")
    scoring.add_argument("--model", type=Path, default=Path("models/demo"), help="NAME[/VERSION]")
    scoring.add_argument("--input", default="data/demo", help="folder, glob or manifest")
    scoring.add_argument("--engines", default="local,grpc,ray", help="comma-separated")
    scoring.add_argument("--limit-seconds", type=float, default=4.0, help="per batch size")
    scoring.add_argument("--ray-cpus", type=int, default=2)
    scoring.add_argument("--results", type=Path, default=Path("bench/results"))
    scoring.add_argument(
        "--scratch",
        type=Path,
        default=Path("bench/scratch/scoring"),
        help="where the engines write their output",
    )
    return parser


def _images(folder: Path | None) -> list[bytes]:
    from bench.workload import load_folder, photo_folder

    return load_folder(folder or photo_folder())


def main(argv: list[str] | None = None) -> int:
    from bench.processes import exit_on_sigterm

    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    if args.command == "load":
        from bench.load import run_load
        from service.server import eventloop

        latencies: list[float] = []
        if args.payload == "tensor" and args.protocol != "oip":
            raise SystemExit("--payload tensor needs --protocol oip")
        if args.protocol == "oip":
            from bench.oip_load import ours, ours_tensor, run_oip_load

            if args.rate is not None:
                raise SystemExit("--protocol oip is closed loop")
            target = (
                ours_tensor(args.target, args.model)
                if args.payload == "tensor"
                else ours(args.target, args.model)
            )
            coroutine = run_oip_load(
                target,
                _images(args.images),
                concurrency=args.concurrency,
                seconds=args.seconds,
                warmup=args.warmup,
                channels=args.channels,
                images_per_request=args.images_per_request,
                latencies_out=latencies,
            )
        else:
            coroutine = run_load(
                args.target,
                _images(args.images),
                model=args.model,
                concurrency=args.concurrency,
                rate=args.rate,
                seconds=args.seconds,
                max_requests=args.requests,
                warmup=args.warmup,
                images_per_request=args.images_per_request,
                method=args.method,
                channels=args.channels,
                latencies_out=latencies,
            )
        result = eventloop.run(coroutine)
        if args.latencies:
            args.latencies.write_text("".join(f"{v:.6f}\n" for v in latencies))
        print(result.to_json())
        print(result.summary(), file=sys.stderr)
        if args.json:
            args.json.write_text(result.to_json() + "\n")
        return 0
    if args.command == "features":
        from bench.features import main as features_main

        features_main(args)
        return 0
    if args.command == "limit":
        from bench.limit import measure_limit

        limit = measure_limit(args.model, _images(args.images), seconds=args.seconds)
        print(json.dumps(limit.as_dict()))
        print(limit.summary(), file=sys.stderr)
        return 0
    if args.command == "scoring":
        from bench.scoring import ENGINES, run_scoring_bench

        engines = tuple(e for e in args.engines.split(",") if e)
        unknown = set(engines) - set(ENGINES)
        if unknown:
            raise SystemExit(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
        report = run_scoring_bench(
            args.model,
            args.input,
            engines=engines,
            limit_seconds=args.limit_seconds,
            ray_cpus=args.ray_cpus,
            results=args.results,
            scratch=args.scratch,
        )
        print(json.dumps(report["ratios"]))
        return 0
    from bench.report import run_report

    run_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
