"""Image bytes → the model's uint8 NHWC input: decode, limits, orientation, colour, resize.

This module owns the resize policy on the serving side; ``image_header`` checks the limits
before anything is decoded, and ``geometry`` plans where the image lands. Training's eval
transform (``training.presets``) uses the same geometry functions and the same loader, and a
test keeps the two equal, so a model sees the same pixels in production as in evaluation.

Everything here is pure Python + Pillow + NumPy and thread-safe: the server runs it in a
thread pool so that decoding overlaps inference (Pillow releases the GIL while decoding and
resizing).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps

from service.model.decode_budget import DecodeBudget
from service.model.errors import (
    InvalidImageError,
    ResourceExhaustedError,
    ServiceError,
)
from service.model.geometry import (
    Geometry,
    plan_geometry,
)
from service.model.image_header import (
    TRANSPOSING_ORIENTATIONS,
    UNLIMITED,
    ImageLimits,
    check_shape,
    exif_orientation,
    open_header,
    where_in_request,
)
from service.model.spec import DecodeMode, Interpolation, ModelSpec, Preprocessing, ResizeMode

T = TypeVar("T")


_RESAMPLE = {
    Interpolation.NEAREST: Image.Resampling.NEAREST,
    Interpolation.BILINEAR: Image.Resampling.BILINEAR,
    Interpolation.BICUBIC: Image.Resampling.BICUBIC,
}


# Corrupt EXIF or ICC data makes Pillow warn; that is not the caller's error, and
# ``warnings.catch_warnings`` per image would not be thread-safe, so they are ignored once.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


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
            f"{where_in_request(index)}not enough memory to {action} the image; retry later"
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
        turn = exif_orientation(image) if orientation is None else orientation
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
    image = open_header(data, limits, index)
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
    orientation = exif_orientation(image)
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
    if orientation in TRANSPOSING_ORIENTATIONS:
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
    image = open_header(data, limits, index)
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
