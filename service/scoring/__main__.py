r"""``python -m service.scoring``: score many images offline, exactly once, resumably.

    python -m service.scoring --model models/demo --input photos/ --output scores/
    python -m service.scoring --model models/demo/2 --input list.csv --output scores.jsonl \
        --task localize
    python -m service.scoring --engine grpc --target localhost:50051 --model demo ...
    python -m service.scoring --engine ray [--address ray://head:10001] ...

Rerunning the same command after a crash finishes the job without scoring anything twice.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from service.model.layout import resolve_model_file

try:  # the serving install leaves these out: say what to install instead of a traceback
    import pyarrow  # noqa: F401
    import tqdm  # noqa: F401
except ImportError as missing:
    sys.exit(
        f"python -m service.scoring needs the scoring extra ({missing.name} is not "
        "installed): pip install 'imgclf[scoring]'"
    )

from service.scoring.job import FORMATS, JobError, JobSpec, output_format, run_job
from service.scoring.sources import find_inputs, fingerprint

log = logging.getLogger("service.scoring")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m service.scoring",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="models/NAME[/VERSION] (local, ray); NAME[/VERSION] also for grpc",
    )
    p.add_argument(
        "--input",
        required=True,
        help="folder (recursive), glob, or manifest (.csv/.parquet with a 'path' "
        "column, or .txt with one path per line)",
    )
    p.add_argument(
        "--output", required=True, type=Path, help="Parquet dataset folder, or a .csv / .jsonl file"
    )
    p.add_argument("--format", choices=FORMATS, help="default: from the output's suffix")
    p.add_argument("--engine", choices=["local", "grpc", "ray"], default="local")
    p.add_argument("--task", choices=["classify", "localize"], default="classify")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--shard-size", type=int, default=1000, help="inputs per committed shard")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--overwrite", action="store_true", help="discard existing output")
    p.add_argument(
        "--allow-model-change",
        action="store_true",
        help="resume an output scored with another model version",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--include-all-files",
        action="store_true",
        help="score every file of a folder, not only those with an image suffix (files "
        "that are not images get error rows); by default they are skipped and counted",
    )
    g = p.add_argument_group("grpc engine")
    g.add_argument("--target", default="localhost:50051")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    g.add_argument(
        "--channels", type=int, default=4, help="connections (spread over the server's workers)"
    )
    g.add_argument("--images-per-request", type=int, default=16)
    g.add_argument("--timeout", type=float, default=120.0)
    g.add_argument(
        "--token",
        default=os.environ.get("CLASSIFIER_TOKEN"),
        help="bearer token, if the server requires one (env CLASSIFIER_TOKEN)",
    )
    g.add_argument("--token-file", type=Path, help="read the bearer token from this file")
    g.add_argument("--tls", action="store_true", help="TLS with the system roots")
    g.add_argument("--ca", type=Path, help="PEM root certificates for TLS (implies TLS)")
    g.add_argument("--cert", type=Path, help="PEM client certificate (mTLS)")
    g.add_argument("--key", type=Path, help="PEM private key of --cert")
    g.add_argument("--server-name", help="the name the server certificate is for")
    g.add_argument(
        "--retry-seconds",
        type=float,
        default=300.0,
        help="how long to keep retrying a request the server refuses as busy",
    )
    r = p.add_argument_group("ray engine")
    r.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    r.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    r.add_argument(
        "--actors", type=int, help="ONNX Runtime actors (default: one per CPU, or one per GPU)"
    )
    r.add_argument("--gpus-per-actor", type=float, default=0.0)
    return p


def make_engine(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if args.engine == "grpc":
        from service.client import read_token_file
        from service.scoring.grpc_engine import GrpcEngine

        return GrpcEngine(
            args.target,
            args.model,
            task=args.task,
            top_k=args.top_k,
            images_per_request=args.images_per_request,
            concurrency=args.concurrency,
            timeout=args.timeout,
            token=read_token_file(args.token_file) if args.token_file else args.token,
            tls=args.tls,
            root_certificates=args.ca,
            certificate_chain=args.cert,
            private_key=args.key,
            server_name=args.server_name,
            retry_seconds=args.retry_seconds,
            channels=args.channels,
        )
    model_path = resolve_model_file(args.model)
    if args.engine == "ray":
        from service.scoring.ray_engine import RayEngine

        return RayEngine(
            model_path,
            task=args.task,
            top_k=args.top_k,
            batch_size=args.batch_size,
            address=args.address,
            num_cpus=args.num_cpus,
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
        )
    from service.scoring.local import LocalEngine

    return LocalEngine(model_path, task=args.task, top_k=args.top_k, batch_size=args.batch_size)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        inputs = find_inputs(args.input, include_all_files=args.include_all_files)
        paths = inputs.paths
        if not paths:
            raise JobError(
                f"no images found in {args.input}"
                + (f" ({inputs.skipped_line()})" if inputs.not_images else "")
            )
        skipped = inputs.skipped_line()
        if skipped:
            log.warning("%s", skipped)
        engine = make_engine(args)
    except (FileNotFoundError, ValueError, JobError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # e.g. the gRPC server is unreachable
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    spec = JobSpec(
        inputs=len(paths),
        fingerprint=fingerprint(paths),
        shard_size=args.shard_size,
        format=output_format(args.output, args.format),
        task=args.task,
        top_k=args.top_k,
        model=engine.model,
        version=engine.version,
    )
    try:
        summary = run_job(
            engine,
            paths,
            args.output,
            spec=spec,
            overwrite=args.overwrite,
            allow_model_change=args.allow_model_change,
            progress=not args.no_progress,
        )
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.close()
    print(summary.line() + (f"; {skipped}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
