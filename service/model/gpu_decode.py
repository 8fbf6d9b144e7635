"""JPEG decoding on the GPU (nvImageCodec), resized on the device into model-input rows.

For a model that runs on a GPU, a request's JPEGs are decoded together by nvImageCodec
(nvJPEG: the hardware JPEG engines where the GPU has them, else CUDA) straight into device
memory, resized there by the serving resize as an ONNX graph (``service.model.device_resize``)
into a buffer of model-input rows, and later copied row by row into the batch that
ONNX Runtime reads through IO binding. No pixel crosses back to the host.

Everything the CPU path checks is checked first, from the header alone: bytes, pixels,
aspect ratio, format (Pillow parses the header; nothing is decoded on the host). What this
path does not take goes to the CPU path, image by image, with the same limits and errors:
formats other than baseline or progressive JPEG in RGB or greyscale (PNG, WebP, CMYK
JPEG, ...), and any image nvImageCodec cannot decode or decodes to an unexpected size.
Decoded pixels are held in the decode budget (``max_decode_pixels``) from before the
decode until their resize is done, as on the CPU.

``DecodedImage`` and ``ImageDecoder`` are the seam (``image_decoders``): ``NvImageDecoder``
is the real one (it needs a CUDA device); tests on machines without one decode with Pillow
into host memory and run the same resize and batch assembly on ONNX Runtime's CPU provider.

The pixels differ from the CPU path's by a level or two (nvJPEG's IDCT and upsampling are
not libjpeg-turbo's, and the resize runs in float, not in Pillow's 8-bit passes):
``DevicePreprocessor.self_check`` measures it at load and refuses the path beyond
``MAX_MEAN_DIFFERENCE``.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from service.model.decode_budget import DecodeBudget
from service.model.errors import ServiceError
from service.model.geometry import Geometry, plan_geometry
from service.model.image_decoders import NvImageDecoder
from service.model.image_header import (
    TRANSPOSING_ORIENTATIONS,
    ImageLimits,
    exif_orientation,
    open_header,
)
from service.model.preprocess import preprocess_encoded
from service.model.spec import ModelSpec

log = logging.getLogger(__name__)

# Mean absolute difference, in levels of 0..255, between this path's model input and the
# CPU path's on the self-check image, beyond which the GPU path is not used.
MAX_MEAN_DIFFERENCE = 2.0
_GPU_FORMATS = ("JPEG", "MPO")
_GPU_MODES = ("RGB", "L")


class DecodedImage(Protocol):
    """Decoded pixels in memory the resize can read: contiguous uint8 ``height`` ×
    ``width`` × 3 at ``pointer`` (device memory, or host memory for the CPU stand-in).
    Whatever owns the memory stays alive as long as this object."""

    @property
    def pointer(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def width(self) -> int: ...


class ImageDecoder(Protocol):
    device: str  # "cuda" or "cpu": where the decoded pixels are

    def decode(self, datas: Sequence[bytes]) -> list[DecodedImage | None]:
        """Decode a batch; None where an image could not be decoded. Thread-safe."""
        ...


@dataclass(frozen=True)
class DeviceRow:
    """One model-input row already in the runner's memory (a slot of a request's buffer).
    The batch copies it in; the buffer lives as long as any of its rows."""

    rows: Any  # the request's buffer (an ONNX Runtime OrtValue [k, H, W, 3])
    index: int
    pointer: int


class DeviceResize(Protocol):
    """The runner's side: buffers of rows and the resize into them (ONNX Runtime)."""

    device: str

    def new_rows(self, count: int) -> Any: ...
    def rows_pointer(self, rows: Any) -> int: ...
    def resize_into(self, image: DecodedImage, geometry: Geometry, dst: int) -> None: ...


@dataclass(frozen=True)
class _Candidate:
    position: int  # in the request
    data: bytes
    geometry: Geometry
    pixels: int


PreparedRow = tuple[DeviceRow, Geometry]
Outcome = PreparedRow | ServiceError | None  # None: give it to the CPU path


class DevicePreprocessor:
    """A request's encoded images → model-input rows on the device (or, per image, the
    word that the CPU path must take it, or the error that the CPU path would raise)."""

    def __init__(self, spec: ModelSpec, decoder: ImageDecoder, resize: DeviceResize):
        self.spec = spec
        self.decoder = decoder
        self.resize = resize
        self._fallbacks = 0
        self._lock = threading.Lock()

    @property
    def fallbacks(self) -> int:
        """Images this path handed to the CPU path so far."""
        return self._fallbacks

    def _candidate(
        self, position: int, data: bytes, limits: ImageLimits, index: int
    ) -> _Candidate | None:
        image = open_header(data, limits, index)  # the CPU path's limits and errors
        try:
            if image.format not in _GPU_FORMATS or image.mode not in _GPU_MODES:
                return None
            width, height = image.size
            if exif_orientation(image) in TRANSPOSING_ORIENTATIONS:
                width, height = height, width
        finally:
            image.close()
        prep, spec_in = self.spec.preprocessing, self.spec.input
        geometry = plan_geometry(width, height, prep, spec_in.height, spec_in.width)
        return _Candidate(position, data, geometry, width * height)

    def prepare(
        self,
        datas: Sequence[bytes],
        limits: ImageLimits,
        budget: DecodeBudget | None = None,
        deadline: float | None = None,
        indices: Sequence[int] | None = None,
    ) -> list[Outcome]:
        """One outcome per image, in order. Never raises for an image's own fault.
        ``indices``: each image's index in its request, for error messages."""
        index_of = list(range(len(datas))) if indices is None else list(indices)
        outcomes: list[Outcome] = [None] * len(datas)
        candidates: list[_Candidate] = []
        for position, data in enumerate(datas):
            try:
                candidate = self._candidate(position, data, limits, index_of[position])
            except ServiceError as exc:
                outcomes[position] = exc
                continue
            if candidate is not None:
                candidates.append(candidate)
        for chunk in _chunks(candidates, budget.max_pixels if budget else None):
            pixels = sum(c.pixels for c in chunk)
            try:
                reservation = (
                    budget.reserve(pixels, deadline, index_of[chunk[0].position])
                    if budget is not None
                    else _no_reservation()
                )
                with reservation:
                    self._decode_chunk(chunk, outcomes)
            except ServiceError as exc:  # the budget's deadline: these images' own error
                for candidate in chunk:
                    outcomes[candidate.position] = exc
        misses = sum(1 for o in outcomes if o is None)
        if misses:
            with self._lock:
                self._fallbacks += misses
        return outcomes

    def _decode_chunk(self, chunk: list[_Candidate], outcomes: list[Outcome]) -> None:
        try:
            decoded = self.decoder.decode([c.data for c in chunk])
        except Exception as exc:  # the decoder's failure is not the images' fault
            log.warning("GPU decode failed for %d image(s), using the CPU: %s", len(chunk), exc)
            return
        good = []
        for candidate, image in zip(chunk, decoded, strict=True):
            g = candidate.geometry
            if image is not None and (image.height, image.width) == (
                g.original_height,
                g.original_width,
            ):
                good.append((candidate, image))
        if not good:
            return
        rows = self.resize.new_rows(len(good))
        base = self.resize.rows_pointer(rows)
        row_bytes = self.spec.input.height * self.spec.input.width * 3
        try:
            for j, (candidate, image) in enumerate(good):
                pointer = base + j * row_bytes
                self.resize.resize_into(image, candidate.geometry, pointer)
                outcomes[candidate.position] = (
                    DeviceRow(rows, j, pointer),
                    candidate.geometry,
                )
        except Exception as exc:
            log.warning("device resize failed, using the CPU: %s", exc)
            for candidate, _ in good:
                outcomes[candidate.position] = None

    def self_check(self, limits: ImageLimits) -> float:
        """Mean absolute difference from the CPU path on a synthetic photo-like JPEG;
        raises ValueError past ``MAX_MEAN_DIFFERENCE`` (the path is then not used)."""
        data = _check_jpeg()
        (outcome,) = self.prepare([data], limits)
        if not isinstance(outcome, tuple):
            raise ValueError(f"the GPU path could not decode its self-check image ({outcome})")
        row, _ = outcome
        got = self.read_row(row)
        want, _ = preprocess_encoded(data, self.spec, limits)
        difference = float(np.abs(got.astype(np.int16) - want).mean())
        if difference > MAX_MEAN_DIFFERENCE:
            raise ValueError(
                f"the GPU path's pixels differ from the CPU path's by {difference:.2f} levels "
                f"on average (more than {MAX_MEAN_DIFFERENCE}): not used"
            )
        return difference

    def read_row(self, row: DeviceRow) -> np.ndarray:
        """A row's pixels on the host (checks and tests only)."""
        reader: Callable[[DeviceRow], np.ndarray] = getattr(self.resize, "read_row")  # noqa: B009
        return reader(row)


@contextmanager
def _no_reservation() -> Iterator[None]:
    yield


def _chunks(candidates: list[_Candidate], max_pixels: int | None) -> Iterator[list[_Candidate]]:
    """Consecutive groups whose pixels fit the decode budget at once."""
    chunk: list[_Candidate] = []
    total = 0
    for candidate in candidates:
        if chunk and max_pixels is not None and total + candidate.pixels > max_pixels:
            yield chunk
            chunk, total = [], 0
        chunk.append(candidate)
        total += candidate.pixels
    if chunk:
        yield chunk


def _check_jpeg() -> bytes:
    """A 640×480 JPEG with edges, gradients and texture (deterministic)."""
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    rng = np.random.default_rng(0)
    pixels = np.stack(
        [
            (x / 640 * 255),
            (y / 480 * 255),
            ((np.sin(x / 9) * np.cos(y / 13) + 1) * 127),
        ],
        axis=-1,
    )
    pixels[100:300, 200:420] = (230, 40, 40)
    pixels += rng.normal(0, 6, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


DecodeDevice = str  # "auto" | "cpu" | "gpu" (the decode_device setting)


def device_preprocessor_for(
    runner: Any, mode: DecodeDevice, limits: ImageLimits, decoders: int = 2
) -> DevicePreprocessor | None:
    """The GPU decode path for a loaded runner, as ``decode_device`` asks: ``cpu`` never;
    ``auto`` when the model runs on a GPU and nvImageCodec starts and passes its self-check
    (otherwise logged, and the CPU decodes); ``gpu`` the same, but a model that cannot have
    it fails to load, saying why."""
    if mode == "cpu":
        return None
    if not runner.on_gpu:
        if mode == "gpu":
            raise ValueError(
                "decode_device is gpu but the model runs on "
                f"{runner.active_providers[0]}: GPU decoding needs a GPU provider"
            )
        return None
    try:
        decoder = NvImageDecoder(runner.options.device_id, decoders)
        preprocessor = DevicePreprocessor(runner.spec, decoder, runner.device_resize())
        difference = preprocessor.self_check(limits)
    except Exception as exc:
        if mode == "gpu":
            raise ValueError(f"decode_device is gpu but GPU decoding cannot start: {exc}") from exc
        log.warning(
            "%s: JPEGs are decoded on the CPU (GPU decoding unavailable: %s)", runner.path, exc
        )
        return None
    log.info(
        "%s: JPEGs are decoded on the GPU (nvImageCodec; %.2f levels from the CPU path)",
        runner.path,
        difference,
    )
    return preprocessor
