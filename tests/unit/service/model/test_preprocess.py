"""Decoding, limits, colour modes, orientation and the resize policy of the server."""

from __future__ import annotations

import io
import struct
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from service.model.decode_budget import DecodeBudget
from service.model.errors import InvalidImageError, LimitExceededError
from service.model.geometry import plan_geometry
from service.model.image_header import ImageLimits
from service.model.preprocess import (
    open_image,
    preprocess_encoded,
    preprocess_raw,
    resize_target_for,
)
from service.model.spec import DecodeMode, InputSpec, ModelSpec, Preprocessing, ResizeMode, Task

LIMITS = ImageLimits()


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def spec(mode: ResizeMode = ResizeMode.STRETCH, size: int = 32) -> ModelSpec:
    resize = int(size / 0.875) if mode is ResizeMode.CENTER_CROP else size
    return ModelSpec(
        name="t",
        task=Task.CLASSIFICATION,
        labels=["a"],
        input=InputSpec(height=size, width=size),
        preprocessing=Preprocessing(resize_mode=mode, resize_size=resize),
    )


def gradient(w: int = 40, h: int = 30) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    return Image.fromarray(np.stack([x, x[::-1], np.full_like(x, 90)], axis=2))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_supported_formats_decode_to_rgb(fmt: str) -> None:
    decoded = open_image(encode(gradient(), fmt), LIMITS)
    assert decoded.mode == "RGB" and decoded.size == (40, 30)


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = np.asarray(open_image(buffer.getvalue(), LIMITS))
    assert decoded[0, 0, 0] > 200 and decoded[0, 0, 2] < 50


def test_exif_orientation_is_applied() -> None:
    image = gradient(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    upright = open_image(encode(image, "JPEG", exif=exif.tobytes()), LIMITS)
    assert upright.size == (30, 40)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (4, 4), 200), (200, 200, 200)),
        (Image.new("LA", (4, 4), (10, 0)), (255, 255, 255)),  # transparent → white
        (Image.new("RGBA", (4, 4), (0, 0, 0, 255)), (0, 0, 0)),
        (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),  # I;16
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
    ],
    ids=["L", "LA", "RGBA", "CMYK", "I16", "1"],
)
def test_every_mode_becomes_rgb(image: Image.Image, expected: tuple[int, int, int]) -> None:
    fmt = "TIFF" if image.mode in ("CMYK", "I;16") else "PNG"
    decoded = open_image(encode(image, fmt), LIMITS)
    assert decoded.mode == "RGB"
    assert tuple(np.asarray(decoded)[1, 1]) == expected


def test_palette_with_transparency() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    data = encode(image, "PNG", transparency=0)
    assert tuple(np.asarray(open_image(data, LIMITS))[0, 0]) == (255, 255, 255)


def test_empty_and_garbage_and_truncated_bytes_are_invalid() -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        open_image(b"", LIMITS)
    with pytest.raises(InvalidImageError, match="not a decodable image"):
        open_image(np.random.default_rng(0).bytes(5000), LIMITS)
    jpeg = encode(
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG"
    )
    with pytest.raises(InvalidImageError, match="cannot decode JPEG"):
        open_image(jpeg[: len(jpeg) // 2], LIMITS, index=3)


def test_byte_limit_names_the_limit() -> None:
    data = encode(gradient(), "PNG")
    with pytest.raises(LimitExceededError, match=f"over the limit of {len(data) - 1:,}"):
        open_image(data, ImageLimits(max_bytes=len(data) - 1))


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (the classic decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * width
    data = zlib.compress(row * 16, 9)  # far fewer rows than claimed
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_from_the_header() -> None:
    data = bomb_png(30000, 30000)
    assert len(data) < 10_000
    with pytest.raises(LimitExceededError, match="pixel count \\(30000x30000\\)"):
        open_image(data, LIMITS)


def test_raw_image_shape_is_checked() -> None:
    with pytest.raises(InvalidImageError, match="declared 4x5x3 = 60 bytes but carries 59"):
        preprocess_raw(4, 5, b"\x00" * 59, spec(), LIMITS, index=0)
    out, geometry = preprocess_raw(4, 5, b"\x07" * 60, spec(), LIMITS)
    assert out.shape == (32, 32, 3) and int(out[0, 0, 0]) == 7
    assert (geometry.original_width, geometry.original_height) == (5, 4)


def test_jpeg_draft_mode_decodes_large_images_smaller_but_alike() -> None:
    big = gradient(1600, 1200).resize((1600, 1200))
    data = encode(big, "JPEG", quality=95)
    target = resize_target_for(spec(ResizeMode.STRETCH, 64))
    drafted = open_image(data, LIMITS, target, draft_factor=2.0)
    assert drafted.size[0] < 1600  # libjpeg decoded at a reduced scale
    fast, _ = preprocess_encoded(
        data, spec(ResizeMode.STRETCH, 64), ImageLimits(jpeg_draft_factor=2)
    )
    exact, _ = preprocess_encoded(data, spec(ResizeMode.STRETCH, 64), LIMITS)
    assert np.abs(fast.astype(int) - exact.astype(int)).mean() <= 1.5


@pytest.mark.parametrize("mode", list(ResizeMode))
def test_geometry_maps_boxes_back_to_the_original(mode: ResizeMode) -> None:
    s = spec(mode, 64)
    geometry = plan_geometry(300, 200, s.preprocessing, 64, 64)
    # A box in the original, forward to input pixels, and back again.
    box = (120.0, 60.0, 180.0, 140.0)
    fwd = (
        box[0] * geometry.scale_x + geometry.offset_x,
        box[1] * geometry.scale_y + geometry.offset_y,
        box[2] * geometry.scale_x + geometry.offset_x,
        box[3] * geometry.scale_y + geometry.offset_y,
    )
    assert geometry.to_original(fwd) == pytest.approx(box)
    # Boxes are clipped to the original image.
    assert geometry.to_original((-50.0, -50.0, 500.0, 500.0)) == (0.0, 0.0, 300.0, 200.0)


@pytest.mark.parametrize("size", [(1, 40000), (40000, 1), (4_000_000, 1), (30, 1)])
def test_images_too_thin_to_resize_are_invalid_naming_the_limit(size: tuple[int, int]) -> None:
    width, height = size
    data = encode(Image.new("L", (min(width, 30), min(height, 30))), "PNG")
    data = data[:16] + struct.pack(">II", width, height) + data[24:]  # only the header lies
    data = data[:29] + struct.pack(">I", zlib.crc32(data[12:29]) & 0xFFFFFFFF) + data[33:]
    with pytest.raises(InvalidImageError, match=r"over the limit of 20:1 \(max_image_aspect"):
        preprocess_encoded(data, spec(ResizeMode.CENTER_CROP), LIMITS, index=0)
    with pytest.raises(InvalidImageError, match="max_image_aspect_ratio"):
        preprocess_raw(1, 21, b"\x00" * 63, spec(ResizeMode.LETTERBOX), LIMITS)
    square_enough = preprocess_raw(1, 20, b"\x00" * 60, spec(ResizeMode.CENTER_CROP), LIMITS)
    assert square_enough[0].shape == (32, 32, 3)


def test_a_png_too_short_for_its_declared_size_is_refused_before_decoding() -> None:
    with pytest.raises(InvalidImageError, match="cannot hold: truncated or a decompression"):
        open_image(bomb_png(6000, 6000), LIMITS)
    # The densest real PNG (one colour) is still longer than its pixels over 1032.
    solid = encode(Image.new("RGB", (3000, 3000)), "PNG", compress_level=9)
    assert open_image(solid, LIMITS).size == (3000, 3000)


def test_errors_carry_no_chained_exception() -> None:
    # A chained exception would keep the failed decode's frames (and pixels) alive.
    jpeg = encode(gradient(64, 64), "JPEG")
    for data in (b"junk" * 10, jpeg[: len(jpeg) // 2], bomb_png(100, 100)[:40]):
        with pytest.raises(InvalidImageError) as info:
            preprocess_encoded(data, spec(), LIMITS)
        assert info.value.__context__ is None and info.value.__cause__ is None


def test_the_budget_is_asked_for_the_draft_reduced_size() -> None:
    asked: list[int] = []

    class Recorder(DecodeBudget):
        @contextmanager
        def reserve(self, pixels: int, deadline: float | None = None, index: int | None = None):  # type: ignore[no-untyped-def,override]
            asked.append(pixels)
            yield

    data = encode(gradient(1600, 1200), "JPEG", quality=90)
    budget = Recorder(10**9)
    draft = spec(ResizeMode.STRETCH, 64)
    draft = draft.model_copy(
        update={
            "preprocessing": draft.preprocessing.model_copy(
                update={"decode": DecodeMode.JPEG_DRAFT}
            )
        }
    )
    preprocess_encoded(data, draft, LIMITS, budget=budget)
    preprocess_encoded(data, spec(ResizeMode.STRETCH, 64), LIMITS, budget=budget)
    preprocess_encoded(encode(gradient(160, 120), "PNG"), draft, LIMITS, budget=budget)
    assert asked[0] <= 1600 * 1200 // 64  # a jpeg_draft model: decoded at 1/8 scale
    assert asked[1] == 1600 * 1200  # a full-decode model: as it was evaluated
    assert asked[2] == 160 * 120


def test_png_orientation_is_still_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = open_image(encode(gradient(40, 30), "PNG", exif=exif.tobytes()), LIMITS)
    assert upright.size == (30, 40)


def test_a_raw_image_over_the_pixel_limit_names_that_limit_not_the_budget() -> None:
    with pytest.raises(LimitExceededError, match=r"\(max_image_pixels\)"):
        preprocess_raw(100_000, 100_000, b"", spec(), LIMITS, budget=DecodeBudget(80_000_000))
