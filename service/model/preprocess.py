"""Image bytes → the model's uint8 NHWC input: decode, limits, orientation, colour, resize.

This module owns the resize policy on the serving side. Training's eval transform
(``training.presets``) uses the same geometry functions and the same loader, and a test
keeps the two equal, so a model sees the same pixels in production as in evaluation.

Everything here is pure Python + Pillow + NumPy and thread-safe: the server runs it in a
thread pool so that decoding overlaps inference (Pillow releases the GIL while decoding
and resizing).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.model.decode_budget import DecodeBudget
from service.model.errors import (
    InvalidImageError,
    LimitExceededError,
    ResourceExhaustedError,
    ServiceError,
)
from service.model.spec import DecodeMode, Interpolation, ModelSpec, Preprocessing, ResizeMode

T = TypeVar("T")

# Pillow opens MPO (multi-picture JPEG from cameras) through its JPEG plugin.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

_RESAMPLE = {
    Interpolation.NEAREST: Image.Resampling.NEAREST,
    Interpolation.BILINEAR: Image.Resampling.BILINEAR,
    Interpolation.BICUBIC: Image.Resampling.BICUBIC,
}

# EXIF orientations 5..8 swap width and height.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}

# Our own pixel limit is checked from the header before any decoding; Pillow's global
# bomb check would otherwise fire first with a less helpful message, so it is disabled
# and ours is the one in force.
Image.MAX_IMAGE_PIXELS = None
# Corrupt EXIF or ICC data makes Pillow warn; that is not the caller's error, and
# ``warnings.catch_warnings`` per image would not be thread-safe, so they are ignored once.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")

# Deflate cannot compress better than 1032:1, so a PNG shorter than its raw pixel bytes
# over this cannot hold the pixels its header declares: it is truncated or a bomb.
_DEFLATE_MAX_RATIO = 1032
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type


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


@dataclass(frozen=True)
class Geometry:
    """How one original image maps onto the model input.

    An original pixel coordinate x maps to ``x * scale_x + offset_x`` in the input tensor
    (same for y). ``resized`` is the size after the resize step, before crop or pad.
    """

    original_width: int
    original_height: int
    resized_width: int
    resized_height: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    def to_original(
        self, box: tuple[float, float, float, float]
    ) -> tuple[float, float, float, float]:
        """Input-pixel xyxy → original-pixel xyxy, clipped to the original image."""
        x0, y0, x1, y1 = box
        ox = [(x - self.offset_x) / self.scale_x for x in (x0, x1)]
        oy = [(y - self.offset_y) / self.scale_y for y in (y0, y1)]
        w, h = self.original_width, self.original_height
        return (
            float(np.clip(ox[0], 0, w)),
            float(np.clip(oy[0], 0, h)),
            float(np.clip(ox[1], 0, w)),
            float(np.clip(oy[1], 0, h)),
        )


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(int): shorter side to ``size``, longer side truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def letterbox_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    scale = min(target_w / width, target_h / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def center_offset(size: int, target: int) -> int:
    # Same expression as torchvision's center_crop, so both sides crop the same pixels.
    return round((size - target) / 2.0)


def plan_geometry(width: int, height: int, prep: Preprocessing, in_h: int, in_w: int) -> Geometry:
    if prep.resize_mode is ResizeMode.CENTER_CROP:
        rw, rh = shorter_side_size(width, height, prep.resize_size)
        left, top = center_offset(rw, in_w), center_offset(rh, in_h)
        return Geometry(width, height, rw, rh, rw / width, rh / height, -left, -top)
    if prep.resize_mode is ResizeMode.LETTERBOX:
        rw, rh = letterbox_size(width, height, in_w, in_h)
        left, top = (in_w - rw) // 2, (in_h - rh) // 2
        return Geometry(width, height, rw, rh, rw / width, rh / height, left, top)
    return Geometry(width, height, in_w, in_h, in_w / width, in_h / height, 0.0, 0.0)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB. Transparency is composited over white (what a viewer shows);
    16/32-bit greyscale is scaled, not clipped, to 8 bits."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float64) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        with image.convert("RGBA") as rgba:
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            with Image.alpha_composite(background, rgba) as composed:
                background.close()
                return composed.convert("RGB")
    return image.convert("RGB")


def _where(index: int | None) -> str:
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


def _check_png_payload(data: bytes, width: int, height: int, index: int | None) -> None:
    if len(data) < 26:
        return  # Pillow would not have opened it; nothing to check
    bit_depth, colour_type = data[24], data[25]
    channels = _PNG_CHANNELS.get(colour_type)
    if channels is None:
        return
    raw_bytes = height * (1 + (width * channels * bit_depth + 7) // 8)
    if len(data) * _DEFLATE_MAX_RATIO < raw_bytes:
        raise InvalidImageError(
            f"PNG declares {width}x{height} pixels ({raw_bytes:,} bytes of image data), "
            f"which {len(data):,} bytes cannot hold: truncated or a decompression bomb",
            index=index,
        )


def _open_header(data: bytes, limits: ImageLimits, index: int | None) -> Image.Image:
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
            _check_png_payload(data, width, height, index)
    except BaseException:
        image.close()
        raise
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # corrupt EXIF: show the image as stored
        return 1


def _translated(work: Callable[[], T], action: str, subject: str, index: int | None) -> T:
    """``work()``, its failures reported as this image's errors ("cannot decode PNG image:
    ...", or "not enough memory" as RESOURCE_EXHAUSTED), never as the server's.

    The error is raised after the except block, never inside it: one raised there keeps
    the original (and every frame and buffer it references) as its __context__, even
    with ``from None``.
    """
    failure: ServiceError | None = None
    try:
        return work()
    except ServiceError:
        raise
    except MemoryError:
        failure = ResourceExhaustedError(
            f"{_where(index)}not enough memory to {action} the image; retry later"
        )
    except Exception as exc:
        failure = InvalidImageError(f"cannot {action} {subject}: {exc}", index=index)
    raise failure


def _decode_upright_rgb(
    image: Image.Image, orientation: int | None, index: int | None
) -> Image.Image:
    """Decode the pixels of an opened image to upright RGB; closes what it replaces.

    ``orientation`` None: read it once the pixels are loaded (see ``_prepare_decode``).
    """

    def decode() -> Image.Image:
        image.load()  # the first frame of animated GIF/WebP and multi-page TIFF
        turn = _orientation(image) if orientation is None else orientation
        current = ImageOps.exif_transpose(image) if turn != 1 else image
        try:
            rgb = to_rgb(current)
        finally:
            if current is not image and current.mode != "RGB":
                current.close()  # to_rgb made a copy, or failed: this one is done
        return rgb

    return _translated(decode, "decode", f"{image.format} image", index)


def open_image(
    data: bytes,
    limits: ImageLimits,
    draft_target: Callable[[int, int], tuple[int, int]] | None = None,
    index: int | None = None,
    draft_factor: float | None = None,
) -> Image.Image:
    """Decode encoded bytes to an upright RGB image, enforcing the byte and shape limits.

    ``draft_target`` maps the (width, height) from the header to the size the image will be
    resized to; JPEGs at least ``draft_factor`` (default: the limits') times larger than
    that are decoded at a reduced scale.
    """
    image = _open_header(data, limits, index)
    factor = limits.jpeg_draft_factor if draft_factor is None else draft_factor
    try:
        orientation = _prepare_decode(image, draft_target, factor)
        rgb = _decode_upright_rgb(image, orientation, index)
    except BaseException:
        image.close()
        raise
    if rgb is not image:
        image.close()
    return rgb


def _prepare_decode(
    image: Image.Image,
    draft_target: Callable[[int, int], tuple[int, int]] | None,
    factor: float,
) -> int | None:
    """The JPEG draft scale (which shrinks ``image.size``), before any pixel is decoded.

    JPEGs carry EXIF ahead of their pixels, and the draft needs the orientation, so it is
    read here. Other formats' orientation is read after decoding (None): PNG's
    ``getexif()`` decodes the whole image to look for an eXIf chunk behind the pixels,
    which here would happen outside the decode budget.
    """
    if image.format not in ("JPEG", "MPO"):
        return None
    orientation = _orientation(image)
    if draft_target is not None and factor > 0:
        target = draft_target(*image.size)
        _apply_draft(image, target, orientation, factor)
    return orientation


def _apply_draft(
    image: Image.Image, target: tuple[int, int], orientation: int, factor: float
) -> None:
    if factor <= 0:
        return
    tw, th = target
    if orientation in _TRANSPOSING_ORIENTATIONS:
        tw, th = th, tw
    # draft() picks the largest reduction keeping both sides >= the requested size.
    request = (int(tw * factor), int(th * factor))
    if image.size[0] >= 2 * request[0] and image.size[1] >= 2 * request[1]:
        image.draft("RGB", request)


def resize_target_for(spec: ModelSpec) -> Callable[[int, int], tuple[int, int]]:
    """(width, height) from a header → the size the resize step will produce.

    Used only to choose a JPEG draft scale; the exact resize is recomputed from the decoded
    size, so a draft-reduced image goes through the same policy.
    """
    return _resize_target(spec.preprocessing, spec.input.height, spec.input.width)


def _resize_target(
    prep: Preprocessing, in_h: int, in_w: int
) -> Callable[[int, int], tuple[int, int]]:
    def target(width: int, height: int) -> tuple[int, int]:
        g = plan_geometry(width, height, prep, in_h, in_w)
        return g.resized_width, g.resized_height

    return target


def draft_factor_for(prep: Preprocessing, limits: ImageLimits) -> float:
    """How far above the resize target a JPEG's reduced decode must stay (0: no draft)."""
    return 1.0 if prep.decode == DecodeMode.JPEG_DRAFT else limits.jpeg_draft_factor


def decode_for_model(
    data: bytes,
    prep: Preprocessing,
    in_h: int,
    in_w: int,
    limits: ImageLimits,
    index: int | None = None,
) -> Image.Image:
    """Encoded bytes → the upright RGB image the resize starts from, decoded as the
    model's ModelSpec says. Serving (through ``preprocess_encoded``), evaluation and the
    export's checks all decode with this, so they see the same pixels by construction."""
    return open_image(
        data, limits, _resize_target(prep, in_h, in_w), index, draft_factor_for(prep, limits)
    )


def resize_to_input(
    image: Image.Image, prep: Preprocessing, in_h: int, in_w: int, out: np.ndarray | None = None
) -> tuple[np.ndarray, Geometry]:
    """Resize an RGB image exactly as the eval transform does, into ``out`` (H, W, 3) uint8."""
    width, height = image.size
    geometry = plan_geometry(width, height, prep, in_h, in_w)
    if out is None:
        out = np.empty((in_h, in_w, 3), dtype=np.uint8)
    resample = _RESAMPLE[prep.interpolation]
    size = (geometry.resized_width, geometry.resized_height)
    resized = image if image.size == size else image.resize(size, resample)
    if prep.resize_mode is ResizeMode.CENTER_CROP:
        left, top = int(-geometry.offset_x), int(-geometry.offset_y)
        out[...] = np.asarray(resized.crop((left, top, left + in_w, top + in_h)))
    elif prep.resize_mode is ResizeMode.LETTERBOX:
        left, top = int(geometry.offset_x), int(geometry.offset_y)
        out[...] = prep.pad_value
        out[top : top + size[1], left : left + size[0]] = np.asarray(resized)
    else:
        out[...] = np.asarray(resized)
    return out, geometry


def _reserved(
    budget: DecodeBudget | None, pixels: int, deadline: float | None, index: int | None
) -> AbstractContextManager[None]:
    return nullcontext() if budget is None else budget.reserve(pixels, deadline, index)


def _resize_checked(
    image: Image.Image, spec: ModelSpec, out: np.ndarray | None, index: int | None
) -> tuple[np.ndarray, Geometry]:
    """``resize_to_input``, with its failures reported as this image's errors."""
    prep, height, width = spec.preprocessing, spec.input.height, spec.input.width
    return _translated(
        lambda: resize_to_input(image, prep, height, width, out), "resize", "image", index
    )


def preprocess_encoded(
    data: bytes,
    spec: ModelSpec,
    limits: ImageLimits,
    out: np.ndarray | None = None,
    index: int | None = None,
    budget: DecodeBudget | None = None,
    deadline: float | None = None,
) -> tuple[np.ndarray, Geometry]:
    """Encoded image bytes → (uint8 HxWx3 model input, geometry back to the original).

    With a ``budget``, the decoded pixels are reserved in it (waiting until ``deadline``,
    a ``time.monotonic()`` instant) from before decoding until the resize is done. Every
    Pillow image made on the way is closed before this returns or raises, so a failed
    image's pixels never outlive the call.
    """
    image = _open_header(data, limits, index)
    try:
        factor = draft_factor_for(spec.preprocessing, limits)
        orientation = _prepare_decode(image, resize_target_for(spec), factor)
        width, height = image.size
        with _reserved(budget, width * height, deadline, index):
            # Every image is closed inside the reservation: the budget is only given
            # back once the pixels it stood for are freed.
            try:
                rgb = _decode_upright_rgb(image, orientation, index)
                try:
                    return _resize_checked(rgb, spec, out, index)
                finally:
                    rgb.close()
            finally:
                image.close()
    finally:
        image.close()  # when the header checks or the draft failed


def raw_to_image(
    height: int, width: int, rgb: bytes, limits: ImageLimits, index: int | None = None
) -> Image.Image:
    """A RawImage (H×W×3 uint8, row-major) → RGB image, after checking its declared shape."""
    check_shape(width, height, limits, index)
    expected = height * width * 3
    if len(rgb) != expected:
        raise InvalidImageError(
            f"raw image declared {height}x{width}x3 = {expected:,} bytes but carries "
            f"{len(rgb):,} bytes",
            index=index,
        )
    array = np.frombuffer(rgb, dtype=np.uint8).reshape(height, width, 3)
    return Image.fromarray(array, mode="RGB")


def preprocess_raw(
    height: int,
    width: int,
    rgb: bytes,
    spec: ModelSpec,
    limits: ImageLimits,
    out: np.ndarray | None = None,
    index: int | None = None,
    budget: DecodeBudget | None = None,
    deadline: float | None = None,
) -> tuple[np.ndarray, Geometry]:
    check_shape(width, height, limits, index)  # its own limits first, then the budget
    with _reserved(budget, height * width, deadline, index):
        image = raw_to_image(height, width, rgb, limits, index=index)
        try:
            return _resize_checked(image, spec, out, index)
        finally:
            image.close()


def load_rgb(path: str, limits: ImageLimits | None = None) -> Image.Image:
    """Read an image file as upright RGB with the serving loader, fully decoded (no size cap
    beyond the limits given). Training reads its images with this."""
    with open(path, "rb") as handle:
        data = handle.read()
    return open_image(data, limits or UNLIMITED)


def load_for_model(path: str, prep: Preprocessing, in_h: int, in_w: int) -> Image.Image:
    """Read an image file as the model's serving path decodes it (``decode_for_model``):
    what evaluation and the export's checks feed the eval transform."""
    with open(path, "rb") as handle:
        data = handle.read()
    return decode_for_model(data, prep, in_h, in_w, UNLIMITED)
