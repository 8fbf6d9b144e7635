"""A contact sheet: small images in a grid with a caption each and a title, as one PNG.

Drawn with Pillow rather than matplotlib subplots, which took 1.9 s for a 32-panel figure;
an explain page draws one sheet per stage and image.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

CAPTION_HEIGHT = 12
TITLE_HEIGHT = 18
GAP = 4


def colourise(plane: np.ndarray) -> np.ndarray:
    """A 2-D map scaled to its own range → uint8 RGB through the viridis colour map."""
    low, high = float(plane.min()), float(plane.max())
    scaled = (plane - low) / (high - low) if high > low else np.zeros_like(plane)
    lut = (matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return lut[(scaled * 255).astype(np.uint8)]


def save_tiles(
    tiles: list[np.ndarray],
    captions: list[str],
    title: str,
    path: Path,
    *,
    cell: int = 64,
    columns: int = 8,
) -> None:
    """uint8 [h, w, 3] tiles, each shown at ``cell`` px, ``columns`` to a row."""
    columns = max(1, min(columns, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    width = max(columns * (cell + GAP) + GAP, 8 * len(title) + 2 * GAP)
    height = TITLE_HEIGHT + rows * (cell + CAPTION_HEIGHT + GAP)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((GAP, 3), title, fill="black")
    for n, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        image = Image.fromarray(tile)
        # Nearest keeps a 3x3 map's cells visible as cells; finer maps are smoothed.
        coarse = min(tile.shape[:2]) < cell // 4
        resample = Image.Resampling.NEAREST if coarse else Image.Resampling.BILINEAR
        x = GAP + (n % columns) * (cell + GAP)
        y = TITLE_HEIGHT + (n // columns) * (cell + CAPTION_HEIGHT + GAP)
        sheet.paste(image.resize((cell, cell), resample), (x, y + CAPTION_HEIGHT))
        draw.text((x, y), caption, fill="black")
    sheet.save(path)
