"""Labelled images on disk → samples: ImageFolder layout plus an optional box manifest.

Layout::

    root/train/<class>/*.jpg      root/val/<class>/*.jpg
    root/boxes.csv | boxes.jsonl  (optional) path,label,x_min,y_min,x_max,y_max in pixels,
                                  path relative to root

With a box manifest the dataset is a localization dataset: every image needs a box row.
Files that cannot be used (unreadable, corrupt, no box, label disagreeing with the folder,
box outside the image) are skipped and listed in a report, never a crash. A file that only
turns out to be corrupt when fully decoded during training is dropped from its batch.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from service.model.preprocess import load_for_model, load_rgb
from service.model.spec import Preprocessing

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MANIFEST_NAMES = ("boxes.csv", "boxes.jsonl")
BOX_FIELDS = ("x_min", "y_min", "x_max", "y_max")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    box: tuple[float, float, float, float] | None = None  # pixels, xyxy


@dataclass
class SplitIndex:
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def class_counts(self, num_classes: int) -> list[int]:
        counts = Counter(s.label for s in self.samples)
        return [counts.get(i, 0) for i in range(num_classes)]


@dataclass
class DatasetIndex:
    root: Path
    classes: list[str]
    splits: dict[str, SplitIndex]
    with_boxes: bool

    def report(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "classes": self.classes,
            "task": "localization" if self.with_boxes else "classification",
            "splits": {
                name: {
                    "samples": len(split.samples),
                    "class_counts": split.class_counts(len(self.classes)),
                    "skipped": [{"path": p, "reason": r} for p, r in split.skipped],
                }
                for name, split in self.splits.items()
            },
        }


def find_manifest(root: Path) -> Path | None:
    for name in MANIFEST_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def read_box_manifest(path: Path) -> dict[str, tuple[str, tuple[float, float, float, float]]]:
    """path (relative to the manifest's folder, '/'-separated) → (label, xyxy pixels)."""
    rows: list[dict[str, Any]]
    if path.suffix == ".jsonl":
        with open(path) as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    elif path.suffix == ".csv":
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        raise ValueError(f"{path}: a box manifest must be .csv or .jsonl")
    out: dict[str, tuple[str, tuple[float, float, float, float]]] = {}
    for line_no, row in enumerate(rows, start=2 if path.suffix == ".csv" else 1):
        missing = [k for k in ("path", "label", *BOX_FIELDS) if row.get(k) in (None, "")]
        if missing:
            raise ValueError(f"{path}:{line_no}: missing field(s) {', '.join(missing)}")
        try:
            x0, y0, x1, y1 = (float(row[k]) for k in BOX_FIELDS)
        except ValueError as exc:
            raise ValueError(f"{path}:{line_no}: box is not numeric: {exc}") from None
        out[Path(str(row["path"])).as_posix()] = (str(row["label"]), (x0, y0, x1, y1))
    return out


def _check_image(path: Path) -> str | None:
    """None if the file looks like a readable image, else the reason it is not."""
    try:
        with Image.open(path) as image:
            image.verify()
        return None
    except Exception as exc:
        return f"unreadable image: {type(exc).__name__}: {exc}"


def _scan_split(
    root: Path,
    split: str,
    classes: list[str],
    boxes: dict[str, tuple[str, tuple[float, float, float, float]]] | None,
    verify: bool,
) -> SplitIndex:
    candidates: list[tuple[Path, int]] = []
    skipped: list[tuple[str, str]] = []
    for label, name in enumerate(classes):
        folder = root / split / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    candidates.append((path, label))
                elif not path.name.startswith("."):
                    skipped.append((str(path), "not an image file suffix"))
    problems: list[str | None] = [None] * len(candidates)
    if verify:
        with ThreadPoolExecutor(max_workers=8) as pool:
            problems = list(pool.map(lambda c: _check_image(c[0]), candidates))
    samples: list[Sample] = []
    for (path, label), problem in zip(candidates, problems, strict=True):
        if problem:
            skipped.append((str(path), problem))
            continue
        box = None
        if boxes is not None:
            rel = path.relative_to(root).as_posix()
            if rel not in boxes:
                skipped.append((str(path), "no row in the box manifest"))
                continue
            box_label, box = boxes[rel]
            if box_label != classes[label]:
                skipped.append(
                    (str(path), f"manifest label {box_label!r} != folder {classes[label]!r}")
                )
                continue
            if not (box[0] < box[2] and box[1] < box[3]):
                skipped.append((str(path), f"empty or inverted box {box}"))
                continue
        samples.append(Sample(path, label, box))
    return SplitIndex(samples, skipped)


def load_dataset(
    root: Path,
    *,
    splits: tuple[str, ...] = ("train", "val"),
    manifest: Path | None = None,
    verify: bool = True,
    classes: list[str] | None = None,
) -> DatasetIndex:
    """Index an ImageFolder dataset (and its box manifest, when there is one)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if classes is None:
        class_dirs = {
            p.name
            for s in splits
            if (root / s).is_dir()
            for p in (root / s).iterdir()
            if p.is_dir()
        }
        classes = sorted(class_dirs)
    if not classes:
        raise ValueError(
            f"{root}: no class folders found; expected {root}/<split>/<class>/<image> for "
            f"splits {', '.join(splits)}"
        )
    manifest = manifest or find_manifest(root)
    boxes = read_box_manifest(manifest) if manifest else None
    index = DatasetIndex(
        root=root,
        classes=classes,
        splits={s: _scan_split(root, s, classes, boxes, verify) for s in splits},
        with_boxes=boxes is not None,
    )
    for name, split in index.splits.items():
        if split.skipped:
            log.warning("%s: skipped %d file(s), see the data report", name, len(split.skipped))
    return index


def eval_decoder(prep: Preprocessing, height: int, width: int) -> Callable[[str], Image.Image]:
    """The decoder of evaluation: serving's (``service.model.preprocess.decode_for_model``), so
    the pixels evaluated are the pixels served, JPEG draft scale included."""
    return lambda path: load_for_model(path, prep, height, width)


class ImageDataset(Dataset):
    """Samples → (uint8 CHW tensor, label, normalised xyxy box or NaNs), transformed.

    A file that fails to decode yields ``None``; ``collate_skipping_failures`` drops it.
    ``cache="decoded"`` keeps decoded images in memory (small datasets: decoding is a
    quarter of the per-sample cost); ``cache="output"`` keeps the transformed result, for
    deterministic (eval) transforms only. Each DataLoader worker holds its own cache.
    """

    def __init__(
        self,
        samples: list[Sample],
        transform: Callable[..., Any],
        with_boxes: bool,
        cache: Literal["none", "decoded", "output"] = "none",
        decode: Callable[[str], Image.Image] = load_rgb,
    ):
        self.samples = samples
        self.transform = transform
        self.with_boxes = with_boxes
        self.cache = cache
        # Evaluation decodes as serving does (``eval_decoder``); training, fully.
        self.decode = decode
        self._decoded: dict[int, Image.Image] = {}
        self._outputs: dict[int, tuple[torch.Tensor, int, torch.Tensor] | None] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor] | None:
        if self.cache == "output":
            if i not in self._outputs:
                self._outputs[i] = self._load(i)
            return self._outputs[i]
        return self._load(i)

    def _decode(self, i: int) -> Image.Image:
        if self.cache == "decoded" and i in self._decoded:
            return self._decoded[i]
        image = self.decode(str(self.samples[i].path))
        if self.cache == "decoded":
            self._decoded[i] = image
        return image

    def _load(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor] | None:
        sample = self.samples[i]
        try:
            image = self._decode(i)
        except Exception as exc:
            log.warning("skipping %s: %s", sample.path, exc)
            return None
        if self.with_boxes and sample.box is not None:
            boxes = tv_tensors.BoundingBoxes(
                [sample.box], format="XYXY", canvas_size=(image.height, image.width)
            )
            tensor, boxes = self.transform(image, boxes)
            h, w = tensor.shape[-2:]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            box = boxes[0].as_subclass(torch.Tensor).float() / scale
        else:
            tensor = self.transform(image)
            box = torch.full((4,), float("nan"))
        return tensor.as_subclass(torch.Tensor), sample.label, box


def collate_skipping_failures(
    batch: list[tuple[torch.Tensor, int, torch.Tensor] | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    kept = [b for b in batch if b is not None]
    if not kept:
        return None
    images, labels, boxes = zip(*kept, strict=True)
    return torch.stack(images), torch.tensor(labels), torch.stack(boxes)
