"""The few CUDA runtime calls the GPU decode path makes itself: streams and copies.

ONNX Runtime and nvImageCodec each manage their own device memory; what joins them is a
stream to order decoding before the resize, and device-to-device copies of resized rows
into a batch. Both are one C call each, so they go through ``ctypes`` to the CUDA runtime
that onnxruntime-gpu has already loaded (``libcudart.so.13`` for the 1.31 line), rather
than through a second GPU array library.

``gpu_present()`` answers "is there an NVIDIA GPU this process may use" without touching
CUDA at all (the settings ask it before any model loads).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# Newest first: onnxruntime-gpu 1.31 is built for CUDA 13; 12 is the previous line.
_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
_STREAM_NON_BLOCKING = 0x01
_HOST_TO_DEVICE, _DEVICE_TO_DEVICE = 1, 3


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call and CUDA's error string."""


def gpu_present(dev: Path = Path("/dev")) -> bool:
    """An NVIDIA device node exists and ``CUDA_VISIBLE_DEVICES`` does not hide them all."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    try:
        return any(p.name[len("nvidia") :].isdigit() for p in dev.glob("nvidia[0-9]*"))
    except OSError:
        return False


class CudaRuntime:
    """``libcudart``, loaded once per process (the one already in memory when there is)."""

    _instance: CudaRuntime | None = None

    def __init__(self) -> None:
        errors = []
        for name in _CUDART_NAMES:
            try:
                self._lib = ctypes.CDLL(name)
                break
            except OSError as exc:
                errors.append(str(exc))
        else:
            raise CudaError("cannot load the CUDA runtime: " + "; ".join(errors))
        self._lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.name = name

    @classmethod
    def get(cls) -> CudaRuntime:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            message = self._lib.cudaGetErrorString(status).decode(errors="replace")
            raise CudaError(f"{call} failed: {message} (cudaError {status})")

    def set_device(self, device_id: int) -> None:
        self._check(self._lib.cudaSetDevice(ctypes.c_int(device_id)), "cudaSetDevice")

    def stream_create(self) -> int:
        stream = ctypes.c_void_p()
        self._check(
            self._lib.cudaStreamCreateWithFlags(
                ctypes.byref(stream), ctypes.c_uint(_STREAM_NON_BLOCKING)
            ),
            "cudaStreamCreateWithFlags",
        )
        return int(stream.value or 0)

    def stream_synchronize(self, stream: int) -> None:
        self._check(
            self._lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize"
        )

    def stream_destroy(self, stream: int) -> None:
        self._check(self._lib.cudaStreamDestroy(ctypes.c_void_p(stream)), "cudaStreamDestroy")

    def copy_async(self, dst: int, src: int, count: int, stream: int, from_host: bool) -> None:
        """``count`` bytes to device memory ``dst`` from device (or host) memory ``src``."""
        kind = _HOST_TO_DEVICE if from_host else _DEVICE_TO_DEVICE
        self._check(
            self._lib.cudaMemcpyAsync(
                ctypes.c_void_p(dst),
                ctypes.c_void_p(src),
                ctypes.c_size_t(count),
                ctypes.c_int(kind),
                ctypes.c_void_p(stream),
            ),
            "cudaMemcpyAsync",
        )
