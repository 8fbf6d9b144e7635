"""An encoded image's header, read before anything is decoded: the format, the limits it
must pass (bytes, pixels, aspect ratio, a PNG payload that can hold its pixels) and its
EXIF orientation. Errors name the image's place in the request."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from service.model.errors import InvalidImageError, LimitExceededError

# Our own pixel limit is checked from the header before any decoding; Pillow's global
# bomb check would otherwise fire first with a less helpful message, so it is disabled
# and ours is the one in force.
Image.MAX_IMAGE_PIXELS = None

# Pillow opens MPO (multi-picture JPEG from cameras) through its JPEG plugin.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


# EXIF orientations 5..8 swap width and height.
EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


# Deflate cannot compress better than 1032:1, so a PNG shorter than its raw pixel bytes
# over this cannot hold the pixels its header declares: it is truncated or a bomb.
DEFLATE_MAX_RATIO = 1032
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    # Longer side over shorter side. A 1x40000 image cannot be centre-cropped or
    # letterboxed sensibly, and its resize plan would be enormous.
    max_aspect_ratio: float = 20.0
    # For models whose ModelSpec decodes fully: decode JPEGs at 1/2, 1/4 or 1/8 scale when
    # the reduced image is still this many times the resize target on each side (0: never,
    # the default, which keeps evaluation's pixels). Models that say ``decode: jpeg_draft``
    # always decode at the smallest scale covering the target, as they were evaluated.
    jpeg_draft_factor: float = 0.0


# What training and evaluation use: no limits a real dataset could hit.
UNLIMITED = ImageLimits(max_bytes=1 << 40, max_pixels=1 << 40, max_aspect_ratio=float("inf"))


def where_in_request(index: int | None) -> str:
    return "" if index is None else f"image {index}: "


def check_shape(width: int, height: int, limits: ImageLimits, index: int | None = None) -> None:
    """The limits a declared size must meet before anything is decoded or allocated."""
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"image has no pixels ({width}x{height})", index=index)
    if width * height > limits.max_pixels:
        raise LimitExceededError(
            f"pixel count ({width}x{height})",
            width * height,
            limits.max_pixels,
            setting="max_image_pixels",
            index=index,
        )
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect_ratio:
        raise InvalidImageError(
            f"aspect ratio ({width}x{height}) is {aspect:,.0f}:1, over the limit of "
            f"{limits.max_aspect_ratio:g}:1 (max_image_aspect_ratio): too thin to resize "
            "sensibly",
            index=index,
        )


def check_png_payload(data: bytes, width: int, height: int, index: int | None) -> None:
    if len(data) < 26:
        return  # Pillow would not have opened it; nothing to check
    bit_depth, colour_type = data[24], data[25]
    channels = PNG_CHANNELS.get(colour_type)
    if channels is None:
        return
    raw_bytes = height * (1 + (width * channels * bit_depth + 7) // 8)
    if len(data) * DEFLATE_MAX_RATIO < raw_bytes:
        raise InvalidImageError(
            f"PNG declares {width}x{height} pixels ({raw_bytes:,} bytes of image data), "
            f"which {len(data):,} bytes cannot hold: truncated or a decompression bomb",
            index=index,
        )


def open_header(data: bytes, limits: ImageLimits, index: int | None) -> Image.Image:
    """Parse the header only (no pixels yet) and check the byte and shape limits."""
    if not data:
        raise InvalidImageError("empty image bytes", index=index)
    if len(data) > limits.max_bytes:
        raise LimitExceededError(
            "encoded size in bytes",
            len(data),
            limits.max_bytes,
            setting="max_image_bytes",
            index=index,
        )
    # Raised after the except block, for the reason given in ``_translated``.
    failure = None
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        failure = "not a decodable image (supported formats: JPEG, PNG, WebP, BMP, GIF, TIFF)"
    except Exception as exc:  # Pillow raises many types for malformed headers
        failure = f"cannot read image header: {exc}"
    if failure is not None:
        raise InvalidImageError(failure, index=index)
    try:
        width, height = image.size
        check_shape(width, height, limits, index)
        if image.format == "PNG":
            check_png_payload(data, width, height, index)
    except BaseException:
        image.close()
        raise
    return image


def exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except Exception:  # corrupt EXIF: show the image as stored
        return 1
