"""``python -m training``: a thin CLI over the training library.

    python -m training demo-data [--root data/demo]
    python -m training train [--config FILE.yaml] [--data ROOT] [--backbone NAME] ...
    python -m training train --resume runs/NAME/last.pt
    python -m training evaluate MODEL --data ROOT [--split val]       (MODEL: .pt or .onnx)
    python -m training export CHECKPOINT --repository models --name NAME [--version N]
                              [--precision fp32|fp16|int8] [--accept-drop] [--accept-slower]
                              [--decode auto|full]
    python -m training explain CHECKPOINT IMAGE... --out DIR [--class NAME] [--layer L]
    python -m training compare --data ROOT --backbones resnet18,lenet5,... [--epochs N]

Every TrainConfig field is a flag (``--input-size``, ``--augment-hflip`` for nested
augmentation fields); flags override the YAML file, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from service.model.flags import add_model_flags, collect_flag_values
from training.config import TrainConfig
from training.presets import AugmentConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-data", help="build the offline demo dataset")
    demo.add_argument("--root", type=Path, default=Path("data/demo"))
    demo.add_argument("--force", action="store_true", help="rebuild even if present")

    tr = sub.add_parser("train", help="train or fine-tune a model")
    tr.add_argument("--config", type=Path, help="YAML file of TrainConfig fields")
    tr.add_argument("--resume", type=Path, help="continue the run of this checkpoint (last.pt)")
    add_model_flags(tr, TrainConfig, skip=["augment"])
    add_model_flags(tr, AugmentConfig, prefix="augment_")

    ev = sub.add_parser("evaluate", help="metrics of a checkpoint or ONNX model as JSON")
    ev.add_argument("model", type=Path, help="checkpoint (.pt) or exported model (.onnx)")
    ev.add_argument("--data", type=Path, required=True, help="dataset root (ImageFolder)")
    ev.add_argument("--split", default="val")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--output", type=Path, help="also write the JSON here")
    ev.add_argument("--full", action="store_true", help="include confusion matrix and per-class")
    ex = sub.add_parser("export", help="export a checkpoint as a verified, versioned ONNX model")
    ex.add_argument("checkpoint", type=Path)
    ex.add_argument("--repository", type=Path, default=Path("models"))
    ex.add_argument("--name", required=True, help="model name (folder in the repository)")
    ex.add_argument("--version", type=int, help="default: the next free integer")
    ex.add_argument(
        "--data",
        type=Path,
        help="labelled data for the checks (default: the checkpoint's training data)",
    )
    ex.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int8"],
        default="fp32",
        help="fp16: for GPUs; int8: static QDQ quantization for CPUs",
    )
    ex.add_argument("--quantize", choices=["int8"], help="same as --precision int8")
    ex.add_argument(
        "--per-channel",
        choices=["auto", "on", "off"],
        default="auto",
        help="INT8 weight granularity; auto keeps whichever loses less top-1",
    )
    ex.add_argument(
        "--accept-drop",
        action="store_true",
        help="publish an FP16 or INT8 model even if top-1 drops more than 1 point",
    )
    ex.add_argument(
        "--accept-slower",
        action="store_true",
        help="publish an INT8 model even if it runs slower than FP32 on this machine",
    )
    ex.add_argument(
        "--decode",
        choices=["auto", "full"],
        default="auto",
        help="auto: keep the checkpoint's JPEG draft decode if the export's gate passes "
        "(top-1 agreement with full decode >= 99.5%%, change <= 0.2 pt); full: always "
        "decode every pixel",
    )
    ex.add_argument(
        "--no-gradcam-metrics",
        action="store_true",
        help="skip Grad-CAM's loc accuracy on val (the spec's gradcam_loc_acc)",
    )
    ex.add_argument("--cam-top-k", type=int, default=5, help="class activation maps exported")
    ex.add_argument("--cam-threshold", type=float, default=0.2)
    ex.add_argument("--parity-images", type=int, default=32)
    ex.add_argument("--calibration-images", type=int, default=128)
    _add_explain(sub)
    cp = sub.add_parser(
        "compare",
        help="train, export and measure several backbones with one recipe (table + chart)",
    )
    cp.add_argument(
        "--backbones", type=_comma_list, required=True, help="comma-separated registry names"
    )
    cp.add_argument("--out", type=Path, default=Path("runs/compare"))
    cp.add_argument("--config", type=Path, help="YAML recipe every backbone trains with")
    cp.add_argument(
        "--from-checkpoints",
        action="store_true",
        help="reuse <out>/runs/<backbone>/best.pt where it exists instead of training",
    )
    add_model_flags(cp, TrainConfig, skip=["augment", "backbone", "output"])
    add_model_flags(cp, AugmentConfig, prefix="augment_")
    return parser


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _add_explain(sub: argparse._SubParsersAction) -> None:
    xp = sub.add_parser(
        "explain",
        help="what a checkpoint looks at: activations, filter patterns, Grad-CAM (index.html)",
    )
    xp.add_argument("checkpoint", type=Path)
    xp.add_argument("images", type=Path, nargs="+")
    xp.add_argument("--out", type=Path, required=True, help="folder for the PNGs and index.html")
    xp.add_argument("--class", dest="class_name", help="explain this class (default: the top-k)")
    xp.add_argument("--top-k", type=int, default=3, help="classes explained per image")
    xp.add_argument(
        "--layer", help="Grad-CAM layer: a stage number or module name (default: automatic)"
    )
    xp.add_argument(
        "--layers", type=_comma_list, help="activation grids of these layers (default: every stage)"
    )
    xp.add_argument(
        "--filter-layers",
        type=_comma_list,
        help="filter patterns of these layers (default: the last stage at each resolution)",
    )
    xp.add_argument("--filters", type=int, default=8, help="filter patterns per layer (0: none)")
    xp.add_argument("--steps", type=int, default=60, help="gradient-ascent steps per pattern")


def _explain(args: argparse.Namespace) -> int:
    from training.explain import ExplainOptions, explain

    report = explain(
        args.checkpoint,
        args.images,
        ExplainOptions(
            out=args.out,
            layers=args.layers,
            gradcam_layer=args.layer,
            class_name=args.class_name,
            top_k=args.top_k,
            filters=args.filters,
            filter_layers=args.filter_layers,
            steps=args.steps,
        ),
    )
    summary = {
        "page": report.page,
        "gradcam_layer": report.gradcam_layer,
        "images": [
            {"image": item.path, "top1": item.predictions[0], "peak": item.gradcam[0]["peak"]}
            for item in report.images
        ],
    }
    print(json.dumps(summary, indent=2))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from training.compare import CompareOptions, compare

    recipe = collect_flag_values(args, TrainConfig)
    recipe.pop("backbone", None)
    rows = compare(
        CompareOptions(
            backbones=args.backbones,
            recipe=recipe,
            config=args.config,
            augment=collect_flag_values(args, AugmentConfig, prefix="augment_"),
            out=args.out,
            from_checkpoints=args.from_checkpoints,
            progress=not args.quiet,
        )
    )
    print((args.out / "compare.md").read_text(), end="")
    print(
        f"\nwrote {args.out / 'compare.csv'}, {args.out / 'compare.md'}, {args.out / 'compare.png'}"
    )
    return 0 if rows else 1


def _export(args: argparse.Namespace) -> int:
    from service.model.spec import Precision
    from training.export import ExportOptions, export_checkpoint

    options = ExportOptions(
        repository=args.repository,
        name=args.name,
        version=args.version,
        data=args.data,
        cam_top_k=args.cam_top_k,
        cam_threshold=args.cam_threshold,
        precision=Precision(args.quantize or args.precision),
        parity_images=args.parity_images,
        calibration_images=args.calibration_images,
        per_channel=args.per_channel,
        accept_drop=args.accept_drop,
        accept_slower=args.accept_slower,
        full_decode=args.decode == "full",
        gradcam_metrics=not args.no_gradcam_metrics,
    )
    result = export_checkpoint(args.checkpoint, options)
    print(
        json.dumps(
            {
                "model": str(result.path),
                "version": result.version,
                "precision": result.spec.precision.value,
                "parity": result.parity,
                "metrics": result.spec.metrics,
            },
            indent=2,
        )
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from training.train import train

    if args.resume:
        result = train(resume=args.resume, progress=not args.quiet)
    else:
        config = TrainConfig.from_sources(
            args.config,
            collect_flag_values(args, TrainConfig),
            augment=collect_flag_values(args, AugmentConfig, prefix="augment_"),
        )
        result = train(config, progress=not args.quiet)
    report = {
        "run_dir": str(result.run_dir),
        "best_checkpoint": str(result.best_checkpoint),
        "best_epoch": result.best_epoch,
        "val": {k: v for k, v in result.best_metrics.items()},
        "wall_seconds": round(result.wall_seconds, 1),
    }
    print(json.dumps(report, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate

    metrics = evaluate(
        args.model, args.data, split=args.split, batch_size=args.batch_size, progress=not args.quiet
    )
    if not args.full:
        metrics = {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "per_class")}
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from training.demo_data import build_demo_dataset, is_built

    if is_built(args.root) and not args.force:
        print(f"demo dataset already built at {args.root}")
        return 0
    summary = build_demo_dataset(args.root)
    print(json.dumps({"root": str(args.root), **summary["counts"]}))  # type: ignore[dict-item]
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The ONNX exporter's optimizer passes log every step at INFO.
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handlers = {
        "train": _train,
        "evaluate": _evaluate,
        "export": _export,
        "demo-data": _demo_data,
        "explain": _explain,
        "compare": _compare,
    }
    try:
        return handlers[args.command](args)
    except ValidationError as exc:
        print(f"error: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from training.export import ExportError
        from training.models import PretrainedWeightsError

        if isinstance(exc, PretrainedWeightsError | ExportError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
