"""``python -m training explain``: what a checkpoint looks at, as PNGs and an index.html.

For each image: the model's top-k, a Grad-CAM overlay per class (``training.gradcam``),
and the activation grid of each chosen stage (``training.activations``). For the model:
the filter patterns of chosen stages (``training.filter_patterns``). The page uses only
relative links, so it opens from the folder with no server.

Images go through serving's own decode and resize (``service.model.preprocess``), so what is
explained is what the served model sees; overlays are drawn over the decoded image with
the serving geometry (``service.model.postprocess.heatmap``), as the Localize heatmap is.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw

from service.model.geometry import Geometry
from service.model.image_header import UNLIMITED
from service.model.postprocess import heatmap
from service.model.preprocess import decode_for_model, resize_to_input
from training.activations import layer_outputs, plot_channel_grid
from training.checkpoint import LoadedModel, model_from_checkpoint
from training.filter_patterns import filter_patterns
from training.gradcam import Stage, auto_layer, find_layer, grad_cam, peak_point, stages
from training.models import InputNormalize
from training.tiles import save_tiles

OVERLAY_MAX_SIDE = 320  # overlays are for looking at, not for measuring


@dataclass(frozen=True)
class ExplainOptions:
    out: Path
    layers: list[str] | None = None  # activation grids; default: every stage
    gradcam_layer: str | None = None  # default: training.gradcam.auto_layer
    class_name: str | None = None  # explain this class instead of the top-k
    top_k: int = 3
    filters: int = 8  # filter patterns per layer (the most active channels on the images)
    filter_layers: list[str] | None = None  # default: the last stage of each resolution
    steps: int = 60  # gradient-ascent steps per filter pattern
    max_channels: int = 32  # channels per activation grid


@dataclass
class ExplainedImage:
    path: str
    predictions: list[dict[str, Any]]
    gradcam: list[dict[str, Any]]  # per class: class, probability, file, peak (decoded px)
    activations: list[dict[str, Any]]  # per layer: layer, shape, file, channels
    size: tuple[int, int]  # decoded width, height: the frame of the peaks


@dataclass
class ExplainReport:
    checkpoint: str
    backbone: str
    input_size: tuple[int, int]
    gradcam_layer: str
    images: list[ExplainedImage] = field(default_factory=list)
    filters: list[dict[str, Any]] = field(default_factory=list)
    page: str = ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _default_filter_layers(known: list[Stage]) -> list[Stage]:
    """The last stage at each resolution: one view per level of abstraction."""
    chosen: list[Stage] = []
    for stage in known:
        if chosen and (chosen[-1].height, chosen[-1].width) == (stage.height, stage.width):
            chosen[-1] = stage
        else:
            chosen.append(stage)
    return chosen


def _overlay(
    image: Image.Image, cam: np.ndarray, geometry: Geometry, loaded: LoadedModel
) -> Image.Image:
    h, w = loaded.input_size
    heat = heatmap(cam, geometry, h, w, max_side=OVERLAY_MAX_SIDE)
    base = np.asarray(image.convert("RGB").resize((heat.width, heat.height)), dtype=np.float32)
    colour = matplotlib.colormaps["jet"](heat.values)[..., :3] * 255.0
    blended = 0.55 * base + 0.45 * colour
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))


def _mark(image: Image.Image, point: tuple[float, float], scale: float) -> None:
    x, y = point[0] * scale, point[1] * scale
    draw = ImageDraw.Draw(image)
    for colour, width in (("black", 4), ("white", 2)):
        draw.line([(x - 6, y), (x + 6, y)], fill=colour, width=width)
        draw.line([(x, y - 6), (x, y + 6)], fill=colour, width=width)


class Explainer:
    """One checkpoint, loaded once, explained over any number of images."""

    def __init__(self, checkpoint: Path, options: ExplainOptions):
        self.checkpoint = checkpoint
        self.options = options
        self.loaded = model_from_checkpoint(checkpoint)
        self.model = self.loaded.model.eval()
        prep = self.loaded.preprocessing
        self.normalize = InputNormalize(prep.mean, prep.std)
        self.stages = stages(self.model)
        self.gradcam_stage = (
            find_layer(self.model, options.gradcam_layer)
            if options.gradcam_layer
            else auto_layer(self.model)
        )
        self.activation_stages = (
            [find_layer(self.model, name) for name in options.layers]
            if options.layers
            else self.stages
        )
        self.filter_stages = (
            [find_layer(self.model, name) for name in options.filter_layers]
            if options.filter_layers
            else _default_filter_layers(self.stages)
        )
        if options.class_name is not None and options.class_name not in self.loaded.classes:
            raise ValueError(
                f"class {options.class_name!r} is not one of the model's: "
                f"{', '.join(self.loaded.classes)}"
            )

    def load(self, path: Path) -> tuple[Image.Image, np.ndarray, Geometry, torch.Tensor]:
        """An image file as serving decodes and resizes it, and the normalised input."""
        h, w = self.loaded.input_size
        prep = self.loaded.preprocessing
        image = decode_for_model(path.read_bytes(), prep, h, w, UNLIMITED)
        pixels, geometry = resize_to_input(image, prep, h, w)
        x = self.normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous())
        return image, pixels, geometry, x

    def explain_image(self, number: int, path: Path) -> tuple[ExplainedImage, torch.Tensor]:
        """One image's predictions, Grad-CAM overlays and activation grids, and its
        normalised input (which the filter patterns' channel choice reuses)."""
        out, loaded = self.options.out, self.loaded
        image, _, geometry, x = self.load(path)
        with torch.no_grad():
            probabilities = torch.softmax(self.model(x)[0], dim=1)[0].numpy()
        order = [int(i) for i in np.argsort(-probabilities, kind="stable")]
        predictions = [
            {"class": loaded.classes[i], "probability": round(float(probabilities[i]), 4)}
            for i in order[: self.options.top_k]
        ]
        targets = (
            [loaded.classes.index(self.options.class_name)]
            if self.options.class_name is not None
            else order[: self.options.top_k]
        )
        h, w = loaded.input_size
        scale = min(1.0, OVERLAY_MAX_SIDE / max(image.size))
        gradcams = []
        for rank, target in enumerate(targets):
            result = grad_cam(self.model, x, self.gradcam_stage.module, torch.tensor([target]))
            px, py = peak_point(result.maps[0], h, w)
            peak = geometry.to_original((px, py, px, py))[:2]
            overlay = _overlay(image, result.maps[0], geometry, loaded)
            _mark(overlay, peak, scale)
            name = f"img{number:02d}_gradcam_{rank}_{_slug(loaded.classes[target])}.png"
            overlay.save(out / name)
            gradcams.append(
                {
                    "class": loaded.classes[target],
                    "probability": round(float(probabilities[target]), 4),
                    "file": name,
                    "peak": [round(peak[0], 1), round(peak[1], 1)],
                }
            )
        activations = []
        outputs = layer_outputs(self.model, x, self.activation_stages)
        for stage, batch in zip(self.activation_stages, outputs, strict=True):
            activation = batch[0]
            name = f"img{number:02d}_act_{stage.index:02d}_{_slug(stage.name)}.png"
            title = f"{stage.name}: " + " x ".join(str(v) for v in activation.shape)
            channels = plot_channel_grid(
                activation, title, out / name, max_channels=self.options.max_channels
            )
            activations.append(
                {
                    "layer": stage.name,
                    "shape": list(activation.shape),
                    "file": name,
                    "channels": channels,
                }
            )
        image.save(out / f"img{number:02d}_input.png")
        explained = ExplainedImage(str(path), predictions, gradcams, activations, image.size)
        image.close()
        return explained, x

    def explain_filters(self, inputs: list[torch.Tensor]) -> list[dict[str, Any]]:
        """Patterns of the filters most active on ``inputs``, per filter layer."""
        rows = []
        batch = torch.cat(inputs)
        outputs = layer_outputs(self.model, batch, self.filter_stages)
        for stage, activation in zip(self.filter_stages, outputs, strict=True):
            means = activation.mean(axis=(0, 2, 3))
            channels = [int(c) for c in np.argsort(-means, kind="stable")[: self.options.filters]]
            patterns = filter_patterns(self.model, stage, channels, steps=self.options.steps)
            name = f"filters_{stage.index:02d}_{_slug(stage.name)}.png"
            save_tiles(
                list(patterns),
                [f"filter {c}" for c in channels],
                f"{stage.name}: the input that maximises each filter",
                self.options.out / name,
                cell=max(64, min(128, self.loaded.input_size[0])),
            )
            rows.append({"layer": stage.name, "channels": channels, "file": name})
        return rows


def explain(checkpoint: Path, images: list[Path], options: ExplainOptions) -> ExplainReport:
    """Write the explain page for ``images`` into ``options.out``; returns what it wrote."""
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image: {', '.join(missing)}")
    options.out.mkdir(parents=True, exist_ok=True)
    explainer = Explainer(checkpoint, options)
    report = ExplainReport(
        checkpoint=str(checkpoint),
        backbone=explainer.loaded.config.backbone,
        input_size=explainer.loaded.input_size,
        gradcam_layer=explainer.gradcam_stage.name,
    )
    inputs = []
    for number, path in enumerate(images):
        explained, x = explainer.explain_image(number, Path(path))
        report.images.append(explained)
        inputs.append(x)
    if options.filters > 0 and options.steps > 0:
        report.filters = explainer.explain_filters(inputs)
    page = options.out / "index.html"
    page.write_text(render_page(report, explainer.loaded.classes))
    report.page = str(page)
    (options.out / "explain.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def render_page(report: ExplainReport, classes: list[str]) -> str:
    """index.html: relative links only, no scripts, so it opens straight from the folder."""
    e = html.escape
    h, w = report.input_size
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>explain: {e(Path(report.checkpoint).name)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}"
        "img{max-width:100%;border:1px solid #ccc}figure{display:inline-block;margin:.4em;"
        "vertical-align:top}figcaption{font-size:.85em}section{margin-bottom:2em}"
        "details{margin:.5em 0}</style></head><body>",
        f"<h1>What {e(report.backbone)} looks at</h1>",
        f"<p>Checkpoint <code>{e(report.checkpoint)}</code>, input {h}x{w}, "
        f"{len(classes)} classes. Grad-CAM at <code>{e(report.gradcam_layer)}</code>; "
        "the cross marks each map's peak.</p>",
    ]
    for number, item in enumerate(report.images):
        ranked = ", ".join(f"{e(p['class'])} {p['probability']:.1%}" for p in item.predictions)
        parts.append(f"<section id='img{number}'><h2>{e(Path(item.path).name)}</h2><p>{ranked}</p>")
        parts.append(
            f"<figure><img src='img{number:02d}_input.png'><figcaption>input</figcaption></figure>"
        )
        for cam in item.gradcam:
            parts.append(
                f"<figure><img src='{e(cam['file'])}'><figcaption>Grad-CAM: "
                f"{e(cam['class'])} ({cam['probability']:.1%})</figcaption></figure>"
            )
        parts.append("<details><summary>activations, stage by stage</summary>")
        for act in item.activations:
            parts.append(
                f"<figure><img src='{e(act['file'])}'><figcaption>{e(act['layer'])} "
                f"{'x'.join(str(v) for v in act['shape'])}</figcaption></figure>"
            )
        parts.append("</details></section>")
    if report.filters:
        parts.append(
            "<section><h2>Filter patterns</h2><p>For the filters most active on "
            "these images: the input that maximises each one's mean response.</p>"
        )
        for row in report.filters:
            parts.append(
                f"<figure><img src='{e(row['file'])}'><figcaption>{e(row['layer'])}"
                "</figcaption></figure>"
            )
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
