"""The offline demo dataset: handwritten digits pasted onto crops of real photos.

Everything comes from data that ships inside packages, so the dataset builds with no
network: scikit-learn's 1,797 handwritten 8x8 digits are upscaled to random sizes and
aspect ratios and alpha-blended, in a random colour that contrasts with what lies
underneath, at a random position onto a random crop of one of scikit-image's sample photos.
The tight box around the digit's ink is recorded, so the set serves both classification
(10 classes) and single-object localization.

Train and val come from disjoint source digits (a stratified split of the 1,797), so val
accuracy measures generalisation to unseen handwriting, not memorised strokes.
Output: an ImageFolder (``train/<digit>/*.jpg``, ``val/<digit>/*.jpg``), a box manifest
``boxes.csv`` and ``dataset.json``. The build is deterministic for a given seed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DATASET_VERSION = 2
CLASS_NAMES = [str(d) for d in range(10)]

# Bundled with scikit-image (no download needed); grey ones are converted to RGB.
BACKGROUND_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "brick",
    "camera",
    "grass",
    "gravel",
    "coins",
    "moon",
    "clock",
    "cell",
    "page",
    "text",
)


@dataclass(frozen=True)
class DemoDataConfig:
    seed: int = 0
    train_samples: int = 5600
    val_samples: int = 1000
    val_fraction: float = 0.2  # of the source digits
    min_side: int = 112
    max_side: int = 176
    min_digit_frac: float = 0.45  # digit height as a fraction of the shorter canvas side
    max_digit_frac: float = 0.8
    jpeg_quality: int = 90
    stroke_contrast: float = 2.5  # >1 turns the blurry upscaled 8x8 strokes into crisp ink
    # Train digits only: a random rotation (degrees) and shear, so the 1,437 source digits
    # show more handwriting than they hold (Simard et al., 2003). Val stays undistorted.
    train_rotation: float = 12.0
    train_shear: float = 0.25


def _load_backgrounds() -> list[np.ndarray]:
    import skimage.data

    photos = []
    for name in BACKGROUND_PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        photos.append(np.ascontiguousarray(image[:, :, :3]).astype(np.uint8))
    return photos


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def split_sources(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Stratified split of the source digit indices into disjoint train and val sets."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = max(1, round(len(idx) * val_fraction))
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train)), np.sort(np.array(val))


def _background(rng: np.random.Generator, photos: list[np.ndarray], w: int, h: int) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    ph, pw = photo.shape[:2]
    # A crop of random scale and the canvas's aspect, resized to the canvas.
    scale = rng.uniform(0.3, 1.0)
    ch = max(16, int(min(ph, pw * h / w) * scale))
    cw = max(16, int(ch * w / h))
    cw, ch = min(cw, pw), min(ch, ph)
    y0 = rng.integers(0, ph - ch + 1)
    x0 = rng.integers(0, pw - cw + 1)
    crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def _contrasting_colour(rng: np.random.Generator, patch: np.ndarray) -> np.ndarray:
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    under = float(patch.reshape(-1, 3).mean(axis=0) @ luma)
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        if abs(float(colour @ luma) - under) >= 90:
            return colour
    return np.full(3, 0.0 if under > 127 else 255.0, dtype=np.float32)


def _distort(
    rng: np.random.Generator, digit: Image.Image, rotation: float, shear: float, w: int, h: int
) -> Image.Image:
    """The digit rotated and sheared about its centre, cropped to its ink, fitting w x h."""
    dw, dh = digit.size
    padded = Image.new("L", (2 * dw, 2 * dh))
    padded.paste(digit, (dw // 2, dh // 2))
    angle = np.deg2rad(rng.uniform(-rotation, rotation))
    k = rng.uniform(-shear, shear)
    # Output pixel (x, y) samples input A @ (x - c) + c: the inverse of shear after rotation.
    cos, sin = np.cos(angle), np.sin(angle)
    forward = np.array([[1.0, k], [0.0, 1.0]]) @ np.array([[cos, -sin], [sin, cos]])
    a = np.linalg.inv(forward)
    cx, cy = dw, dh
    offset = np.array([cx, cy]) - a @ np.array([cx, cy])
    coefficients = (a[0, 0], a[0, 1], offset[0], a[1, 0], a[1, 1], offset[1])
    moved = padded.transform(
        padded.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BICUBIC
    )
    ink = moved.point(lambda v: 255 if v > 8 else 0).getbbox()
    if ink is not None:
        moved = moved.crop(ink)
    scale = min(1.0, (w - 2) / moved.width, (h - 2) / moved.height)
    if scale < 1.0:
        size = (max(8, int(moved.width * scale)), max(8, int(moved.height * scale)))
        moved = moved.resize(size, Image.Resampling.BICUBIC)
    return moved


def render_sample(
    rng: np.random.Generator,
    digit: np.ndarray,
    photos: list[np.ndarray],
    cfg: DemoDataConfig,
    *,
    distort: bool = False,
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One composite image and its digit's tight box (x_min, y_min, x_max, y_max) in pixels.

    ``distort`` (train samples) rotates and shears the digit first."""
    w = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    h = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    canvas = _background(rng, photos, w, h)
    dh = int(min(w, h) * rng.uniform(cfg.min_digit_frac, cfg.max_digit_frac))
    dw = max(8, min(w - 2, int(dh * rng.uniform(0.75, 1.15))))
    dh = max(8, min(h - 2, dh))
    alpha_img = Image.fromarray((digit * 255).astype(np.uint8)).resize(
        (dw, dh), Image.Resampling.BICUBIC
    )
    if distort and (cfg.train_rotation > 0 or cfg.train_shear > 0):
        alpha_img = _distort(rng, alpha_img, cfg.train_rotation, cfg.train_shear, w, h)
        dw, dh = alpha_img.size
    alpha = np.asarray(alpha_img, dtype=np.float32) / 255.0
    if cfg.stroke_contrast != 1.0:
        alpha = np.clip((alpha - 0.5) * cfg.stroke_contrast + 0.5, 0.0, 1.0)
    alpha *= rng.uniform(0.85, 1.0)
    x0 = int(rng.integers(0, w - dw + 1))
    y0 = int(rng.integers(0, h - dh + 1))
    region = canvas[y0 : y0 + dh, x0 : x0 + dw]
    colour = _contrasting_colour(rng, region)
    region[...] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
    ink_rows = np.flatnonzero((alpha > 0.3).any(axis=1))
    ink_cols = np.flatnonzero((alpha > 0.3).any(axis=0))
    box = (
        x0 + int(ink_cols[0]),
        y0 + int(ink_rows[0]),
        x0 + int(ink_cols[-1]) + 1,
        y0 + int(ink_rows[-1]) + 1,
    )
    image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
    return image, box


def build_demo_dataset(root: Path, cfg: DemoDataConfig | None = None) -> dict[str, object]:
    """Write the demo dataset to ``root`` (replacing it atomically) and return its summary."""
    cfg = cfg or DemoDataConfig()
    root = Path(root)
    digits, labels = _load_digits()
    photos = _load_backgrounds()
    train_src, val_src = split_sources(labels, cfg.val_fraction, cfg.seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    rows: list[dict[str, object]] = []
    counts: dict[str, int] = {}
    try:
        for split, sources, n, seed_offset in (
            ("train", train_src, cfg.train_samples, 1),
            ("val", val_src, cfg.val_samples, 2),
        ):
            rng = np.random.default_rng([cfg.seed, seed_offset])
            for name in CLASS_NAMES:
                (staging / split / name).mkdir(parents=True, exist_ok=True)
            # Cycle through the sources so every source digit is used about equally.
            order = np.resize(rng.permutation(sources), n)
            for i, src in enumerate(order):
                image, box = render_sample(rng, digits[src], photos, cfg, distort=split == "train")
                label = CLASS_NAMES[labels[src]]
                rel = f"{split}/{label}/{split}_{i:05d}.jpg"
                image.save(staging / rel, quality=cfg.jpeg_quality)
                rows.append(
                    {
                        "path": rel,
                        "label": label,
                        "x_min": box[0],
                        "y_min": box[1],
                        "x_max": box[2],
                        "y_max": box[3],
                    }
                )
            counts[split] = n
        with open(staging / "boxes.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        summary: dict[str, object] = {
            "dataset_version": DATASET_VERSION,
            "classes": CLASS_NAMES,
            "counts": counts,
            "source_digits": {"train": len(train_src), "val": len(val_src)},
            "config": asdict(cfg),
        }
        (staging / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def is_built(root: Path, cfg: DemoDataConfig | None = None) -> bool:
    """True when ``root`` holds a complete demo dataset built with this config."""
    marker = Path(root) / "dataset.json"
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("dataset_version") == DATASET_VERSION and info.get("config") == asdict(
        cfg or DemoDataConfig()
    )
