"""The command line on top of the SDK (``service.client``): classify, localize (with a
drawn box and heatmap), list models, health.

    python -m service.client classify IMG... [--model demo] [--top-k 5]
    python -m service.client localize IMG --draw out.png [--heatmap]
    python -m service.client models
    python -m service.client health            # exit 0 only when SERVING
    python -m service.client --ca ca.pem --cert me.pem --key me.key --token-file t health

"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from service.client.core import DEFAULT_TARGET, read_token_file
from service.client.sync import ClassifierClient
from service.model.results import Classification, Localization


def draw(image_path: Path, result: Localization, out: Path, with_heatmap: bool) -> None:
    """The image with its box and label (and the heatmap blended in) as a PNG/JPEG."""
    from PIL import ImageDraw, ImageOps

    with Image.open(image_path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    if with_heatmap and result.heatmap is not None:
        heat = Image.fromarray((result.heatmap.values * 255).astype(np.uint8)).resize(
            image.size, Image.Resampling.BILINEAR
        )
        v = np.asarray(heat, dtype=np.float32) / 255.0
        colour = np.stack(
            [np.clip(2 * v, 0, 1), np.clip(2 * v - 1, 0, 1), np.zeros_like(v)], axis=2
        )  # black → red → yellow
        blended = 0.55 * np.asarray(image, np.float32) / 255 + 0.45 * colour
        image = Image.fromarray((np.clip(blended, 0, 1) * 255).astype(np.uint8))
    canvas = ImageDraw.Draw(image)
    b = result.box
    width = max(2, round(max(image.size) / 200))
    canvas.rectangle([b.x_min, b.y_min, b.x_max, b.y_max], outline=(0, 255, 0), width=width)
    text = f"{result.top.label} {result.top.score:.2f} ({result.box_source})"
    left, top, right, bottom = canvas.textbbox((b.x_min, b.y_min), text)
    y = max(0.0, b.y_min - (bottom - top) - 4)
    canvas.rectangle(
        [b.x_min, y, b.x_min + (right - left) + 4, y + (bottom - top) + 4], fill=(0, 255, 0)
    )
    canvas.text((b.x_min + 2, y + 2), text, fill=(0, 0, 0))
    image.save(out)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    body = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help="host:port (env CLASSIFIER_TARGET)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline per call, s")
    parser.add_argument(
        "--token",
        default=os.environ.get("CLASSIFIER_TOKEN"),
        help="bearer token (env CLASSIFIER_TOKEN; a flag is visible in ps, prefer the env "
        "or --token-file)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=os.environ.get("CLASSIFIER_TOKEN_FILE"),
        help="read the bearer token from this file (env CLASSIFIER_TOKEN_FILE)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    parser.add_argument("--ca", type=Path, help="PEM root certificates for TLS (implies TLS)")
    parser.add_argument("--cert", type=Path, help="PEM client certificate (mTLS)")
    parser.add_argument("--key", type=Path, help="PEM private key of --cert")
    parser.add_argument(
        "--server-name", help="the name the server certificate is for, if not the target's"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("classify", "localize"):
        p = sub.add_parser(name)
        p.add_argument("images", nargs="+", type=Path)
        p.add_argument("--model", default="")
        p.add_argument("--version", default="")
        p.add_argument("--top-k", type=int, default=5)
        p.add_argument(
            "--images-per-request",
            type=int,
            default=32,
            help="send the images in requests of at most this many (the server refuses "
            "more than its max_images_per_request, 64 by default)",
        )
        if name == "localize":
            p.add_argument(
                "--draw", type=Path, help="write the image with its box here (one input image only)"
            )
            p.add_argument(
                "--heatmap",
                action="store_true",
                help="ask for the heatmap (and overlay it with --draw)",
            )
    sub.add_parser("models", help="list the server's models and versions")
    h = sub.add_parser("health", help="exit 0 when SERVING, 1 otherwise")
    h.add_argument("--service", default="", help="a service name ('' = the whole server)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        token = read_token_file(Path(args.token_file)) if args.token_file else args.token
        with ClassifierClient(
            args.target,
            timeout=args.timeout,
            token=token,
            tls=args.tls,
            root_certificates=args.ca,
            certificate_chain=args.cert,
            private_key=args.key,
            server_name=args.server_name,
            channels=1,  # one call at a time: one connection is enough
        ) as client:
            return _run(client, args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(client: ClassifierClient, args: argparse.Namespace) -> int:
    if args.command == "health":
        status = client.health(args.service)
        print(status)
        return 0 if status == "SERVING" else 1
    if args.command == "models":
        _print_models(client.list_models(), args.json)
        return 0
    results = _infer(client, args)
    if args.json:
        print(json.dumps([_as_json(path, r) for path, r in zip(args.images, results, strict=True)]))
    else:
        _print_results(args.images, results, localized=args.command == "localize")
    if args.command == "localize" and args.draw:
        print(f"wrote {args.draw}")
    return 0


MODEL_COLUMNS = ["model", "version", "state", "task", "backbone", "precision", "providers", "error"]


def _print_models(models: list[Any], as_json: bool) -> None:
    if as_json:
        keys = ("name", "version", "state", "task")
        print(
            json.dumps(
                [{**{k: getattr(m, k) for k in keys}, "labels": list(m.labels)} for m in models]
            )
        )
        return
    rows = [
        [
            m.name,
            m.version,
            m.state,
            m.task,
            m.backbone,
            m.precision,
            ",".join(m.providers),
            m.error,
        ]
        for m in models
    ]
    print(_table(rows, MODEL_COLUMNS))


def _infer(client: ClassifierClient, args: argparse.Namespace) -> list[Any]:
    """classify or localize every image, ``--images-per-request`` at a time."""
    if args.images_per_request < 1:
        raise ValueError("--images-per-request must be at least 1")
    if args.command == "localize" and args.draw and len(args.images) != 1:
        raise ValueError("--draw takes exactly one image")
    step = args.images_per_request
    results: list[Any] = []
    for i in range(0, len(args.images), step):
        chunk = args.images[i : i + step]
        if args.command == "classify":
            results += client.classify(
                chunk, model=args.model, version=args.version, top_k=args.top_k
            )
        else:
            results += client.localize(
                chunk,
                model=args.model,
                version=args.version,
                top_k=args.top_k,
                include_heatmap=args.heatmap,
            )
    if args.command == "localize" and args.draw:
        draw(args.images[0], results[0], args.draw, args.heatmap)
    return results


def _print_results(images: list[Path], results: list[Any], localized: bool) -> None:
    rows = []
    for path, result in zip(images, results, strict=True):
        for rank, p in enumerate(result.predictions, start=1):
            row = [str(path) if rank == 1 else "", str(rank), p.label, f"{p.score:.4f}"]
            if localized:
                b = result.box
                row.append(
                    f"{b.x_min:.0f},{b.y_min:.0f},{b.x_max:.0f},{b.y_max:.0f} ({result.box_source})"
                    if rank == 1
                    else ""
                )
            rows.append(row)
    print(_table(rows, ["image", "rank", "label", "score"] + (["box"] if localized else [])))


def _as_json(path: Path, result: Classification | Localization) -> dict[str, Any]:
    out: dict[str, Any] = {
        "image": str(path),
        "predictions": [
            {"index": p.index, "label": p.label, "score": p.score} for p in result.predictions
        ],
    }
    if isinstance(result, Localization):
        b = result.box
        out["box"] = {
            "x_min": b.x_min,
            "y_min": b.y_min,
            "x_max": b.x_max,
            "y_max": b.y_max,
            "score": b.score,
            "source": result.box_source,
        }
    return out
