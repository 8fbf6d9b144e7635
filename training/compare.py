"""``python -m training compare``: train, export and measure several backbones on one dataset.

Every backbone gets the same recipe and budget (one TrainConfig, only ``backbone``
changes), is exported by the normal exporter (so it passes the same parity checks), and
is measured on this machine: val top-1 (and loc accuracy with boxes) through the serving
path, parameters, multiply-adds, ONNX Runtime latency at batch 1 and throughput at the
best batch, and the file size (``training.model_stats``). The result is a CSV, a Markdown
table and a chart of accuracy against latency with marker area for parameters, after
Canziani et al., "An Analysis of Deep Neural Network Models for Practical Applications"
(2016).

    <out>/runs/<backbone>/best.pt      the training runs (reused with --from-checkpoints)
    <out>/models/<backbone>/<v>/       the exports (reused while the checkpoint is the same)
    <out>/compare.{csv,md,png}
"""

from __future__ import annotations

import csv
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker

from service.model.layout import published_versions
from service.model.sessions import read_metadata
from service.model.spec import ModelSpec, ModelSpecError
from training.checkpoint import file_sha256, load_checkpoint, model_from_checkpoint
from training.config import TrainConfig
from training.export import ExportOptions, export_checkpoint
from training.model_stats import multiply_adds, onnx_speed, served_parameters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareOptions:
    backbones: list[str]
    recipe: dict[str, Any]  # TrainConfig fields shared by every run (data, epochs, ...)
    config: Path | None = None  # a YAML recipe under ``recipe``
    augment: dict[str, Any] = field(default_factory=dict)  # AugmentConfig fields
    out: Path = Path("runs/compare")
    from_checkpoints: bool = False
    progress: bool = False


@dataclass
class CompareRow:
    backbone: str
    top1: float
    loc_acc: float | None
    parameters: int
    mult_adds: int
    latency_ms: float  # batch 1, median
    throughput: float  # images/s at best_batch
    best_batch: int
    size_mb: float
    train_seconds: float | None  # the run's epochs, as its checkpoint recorded them
    checkpoint: str
    model: str
    extra: dict[str, float] = field(default_factory=dict)


def _config(options: CompareOptions, backbone: str) -> TrainConfig:
    overrides = {**options.recipe, "backbone": backbone, "output": options.out / "runs" / backbone}
    return TrainConfig.from_sources(options.config, overrides, augment=options.augment)


def _reusable_export(repository: Path, name: str, checkpoint: Path) -> Path | None:
    """The newest export of ``name`` made from this very checkpoint file, if any."""
    versions = published_versions(repository / name)
    if not versions:
        return None
    path = versions[max(versions)]
    try:
        spec = _spec_of(path)
    except ModelSpecError:
        return None
    return path if spec.checkpoint_sha256 == file_sha256(checkpoint) else None


def _spec_of(path: Path) -> ModelSpec:
    return ModelSpec.from_metadata(read_metadata(path), source=str(path))


def _recorded_seconds(run_dir: Path) -> float | None:
    """A finished run's training time, from the epoch history its last checkpoint keeps."""
    last = run_dir / "last.pt"
    if not last.is_file():
        return None
    history = load_checkpoint(last).get("history") or []
    seconds = [float(row["epoch_seconds"]) for row in history if "epoch_seconds" in row]
    return sum(seconds) if seconds else None


def _train_or_reuse(options: CompareOptions, cfg: TrainConfig) -> tuple[Path, float | None]:
    from training.train import train

    best = cfg.output / "best.pt"
    if options.from_checkpoints and best.is_file():
        log.info("compare: %s reuses %s", cfg.backbone, best)
        return best, _recorded_seconds(cfg.output)
    result = train(cfg, progress=options.progress)
    return result.best_checkpoint, result.wall_seconds


def measure_backbone(options: CompareOptions, backbone: str) -> CompareRow:
    cfg = _config(options, backbone)
    checkpoint, seconds = _train_or_reuse(options, cfg)
    repository = options.out / "models"
    path = _reusable_export(repository, backbone, checkpoint)
    if path is None:
        path = export_checkpoint(
            checkpoint, ExportOptions(repository=repository, name=backbone)
        ).path
    spec = _spec_of(path)
    loaded = model_from_checkpoint(checkpoint)
    speed = onnx_speed(path, loaded.input_size)
    return CompareRow(
        backbone=backbone,
        top1=spec.metrics["onnx_top1"],
        loc_acc=spec.metrics.get("onnx_loc_acc"),
        parameters=served_parameters(loaded.model),
        mult_adds=multiply_adds(loaded.model),
        latency_ms=speed.latency_ms,
        throughput=speed.throughput,
        best_batch=speed.best_batch,
        size_mb=path.stat().st_size / 1e6,
        train_seconds=seconds,
        checkpoint=str(checkpoint),
        model=str(path),
        extra={k: v for k, v in spec.metrics.items() if k.startswith(("gradcam_", "onnx_cam_"))},
    )


def compare(options: CompareOptions) -> list[CompareRow]:
    """Every backbone in turn; writes the table and the chart into ``options.out``."""
    for backbone in options.backbones:
        _config(options, backbone)  # a recipe a backbone cannot take fails before any training
    options.out.mkdir(parents=True, exist_ok=True)
    rows = [measure_backbone(options, backbone) for backbone in options.backbones]
    write_table(rows, options.out / "compare.csv", options.out / "compare.md")
    plot_comparison(rows, options.out / "compare.png")
    return rows


COLUMNS = (
    ("backbone", "backbone", "{}"),
    ("top1", "val top-1", "{:.3f}"),
    ("loc_acc", "val loc acc", "{:.3f}"),
    ("parameters", "params (M)", "{:.2f}"),
    ("mult_adds", "mult-adds (M)", "{:.1f}"),
    ("latency_ms", "latency b1 (ms)", "{:.2f}"),
    ("throughput", "img/s (best batch)", "{:.0f}"),
    ("best_batch", "best batch", "{}"),
    ("size_mb", "file (MB)", "{:.2f}"),
    ("train_seconds", "train (s)", "{:.0f}"),
)


def _cell(row: CompareRow, key: str, fmt: str) -> str:
    value = getattr(row, key)
    if value is None:
        return "–"
    if key in ("parameters", "mult_adds"):
        value = value / 1e6
    return fmt.format(value)


def write_table(rows: list[CompareRow], csv_path: Path, md_path: Path) -> None:
    with open(csv_path, "w", newline="") as handle:
        fields = [k for k in asdict(rows[0]) if k != "extra"] if rows else []
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    lines = [
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row, k, f) for k, _, f in COLUMNS) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")


def plot_comparison(rows: list[CompareRow], path: Path) -> None:
    """Top-1 against batch-1 latency; marker area proportional to the parameter count."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    largest = max((r.parameters for r in rows), default=1)
    for row in rows:
        area = 60 + 1800 * row.parameters / largest
        ax.scatter(row.latency_ms, row.top1, s=area, alpha=0.55, edgecolors="black")
        ax.annotate(
            f"{row.backbone}\n{row.parameters / 1e6:.1f}M params",
            (row.latency_ms, row.top1),
            xytext=(8, 6),
            textcoords="offset points",
            fontsize=8,
        )
    ax.set_xscale("log")
    # Plain numbers on the log axis (2, 5, 10 ms), not powers of ten.
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.margins(x=0.2, y=0.15)
    ax.set_xlabel("ONNX Runtime latency, batch 1 (ms, log scale)")
    ax.set_ylabel("val top-1")
    ax.set_title("Accuracy against latency (marker area: parameters)")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
