"""The decoders behind GPU decoding's seam (``gpu_decode.ImageDecoder``): nvImageCodec into
device memory, and Pillow into host memory as the stand-in where no GPU is."""

from __future__ import annotations

import io
import queue
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # the protocols these implement (gpu_decode imports this module)
    from service.model.gpu_decode import DecodedImage


@dataclass(frozen=True)
class DecodedView:
    pointer: int
    height: int
    width: int
    owner: Any


def cuda_view(image: Any) -> DecodedView | None:
    """An nvImageCodec image in device memory as a view; None for anything else."""
    interface = getattr(image, "__cuda_array_interface__", None)
    if interface is None:
        return None
    shape = tuple(interface["shape"])
    if len(shape) != 3 or shape[2] != 3 or interface["typestr"] != "|u1":
        return None
    height, width = int(shape[0]), int(shape[1])
    strides = interface.get("strides")
    if strides is not None and tuple(int(s) for s in strides) != (width * 3, 3, 1):
        return None  # padded rows or planar: the CPU path takes it
    return DecodedView(int(interface["data"][0]), height, width, image)


class NvImageDecoder:
    """nvImageCodec decoders on one GPU, a few at once (each with its own CUDA stream)."""

    device = "cuda"

    def __init__(self, device_id: int = 0, decoders: int = 2):
        from nvidia import nvimgcodec

        from service.model.cuda import CudaRuntime

        self._nvimgcodec = nvimgcodec
        self._cuda = CudaRuntime.get()
        self._cuda.set_device(device_id)
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=True,
            color_spec=nvimgcodec.ColorSpec.SRGB,
            sample_format=nvimgcodec.SampleFormat.I_RGB,
        )
        self._free: queue.Queue[tuple[Any, int]] = queue.Queue()
        for _ in range(max(1, decoders)):
            decoder = nvimgcodec.Decoder(device_id=device_id)
            self._free.put((decoder, self._cuda.stream_create()))

    @contextmanager
    def _borrow(self) -> Iterator[tuple[Any, int]]:
        pair = self._free.get()
        try:
            yield pair
        finally:
            self._free.put(pair)

    def decode(self, datas: Sequence[bytes]) -> list[DecodedImage | None]:
        streams = [self._nvimgcodec.CodeStream(data) for data in datas]
        with self._borrow() as (decoder, stream):
            images = decoder.decode(streams, params=self._params, cuda_stream=stream)
            # Decoding is asynchronous on that stream; the resize runs on ONNX Runtime's.
            self._cuda.stream_synchronize(stream)
        return [None if image is None else cuda_view(image) for image in images]


class PillowHostDecoder:
    """The stand-in where no GPU is: Pillow decodes into host memory (tests, and machines
    without one). Same interface, same resize and batch code after it."""

    device = "cpu"

    def decode(self, datas: Sequence[bytes]) -> list[DecodedImage | None]:
        out: list[DecodedImage | None] = []
        for data in datas:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    from PIL import ImageOps

                    upright = ImageOps.exif_transpose(image).convert("RGB")
                pixels = np.array(upright)  # its own, contiguous copy
            except Exception:
                out.append(None)
                continue
            h, w = pixels.shape[:2]
            out.append(DecodedView(pixels.ctypes.data, h, w, pixels))
        return out
