"""Closed-loop load over the Open Inference Protocol with the real tritonclient (gRPC aio):
one encoded JPEG per request, as a BYTES tensor. The same client drives our server and
the Triton peer, so the report compares servers, not clients.

``--payload tensor`` sends each image instead as a UINT8 ``[1, H, W, 3]`` tensor at the
model's input size (resized once, before the run, with Pillow): the server then neither
decodes nor resizes, so what is measured is the wire, the batcher and the model — on a
GPU, the figure to hold against inference-only results such as MLPerf's.

Ours takes ``image_bytes`` of shape ``[1]``; the PyTriton peer takes ``IMAGE`` of shape
``[1, 1]`` and calls its model ``model`` (see ../shared/peers/pytriton/README.md).
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as triton
from PIL import Image

from bench.load import CpuProbe, CpuWindow, LoadResult, check_loopback, percentiles


@dataclass(frozen=True)
class OipTarget:
    address: str
    model: str
    input_name: str
    shape: tuple[int, ...]  # of one request's tensor
    datatype: str = "BYTES"


def ours(address: str, model: str) -> OipTarget:
    return OipTarget(address, model, "image_bytes", (1,))


async def ours_tensor(address: str, model: str) -> OipTarget:
    """Our server's UINT8 input for ``model``, as its metadata describes it."""
    client = triton.InferenceServerClient(address)
    try:
        metadata = await client.get_model_metadata(model)
    finally:
        await client.close()
    for tensor in metadata.inputs:
        if tensor.datatype == "UINT8":
            height, width = int(tensor.shape[1]), int(tensor.shape[2])
            return OipTarget(address, model, tensor.name, (1, height, width, 3), "UINT8")
    raise SystemExit(f"model {model!r} at {address} takes no UINT8 tensor input")


def as_tensors(images: Sequence[bytes], height: int, width: int) -> list[np.ndarray]:
    """Each encoded image decoded and resized to [1, height, width, 3] uint8."""
    tensors = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        tensors.append(np.asarray(rgb, dtype=np.uint8)[None])
    return tensors


def pytriton_peer(address: str) -> OipTarget:
    return OipTarget(address, "model", "IMAGE", (1, 1))


async def run_oip_load(
    target: OipTarget,
    images: Sequence[bytes],
    *,
    concurrency: int = 8,
    seconds: float = 10.0,
    warmup: float = 2.0,
    timeout: float = 30.0,
    channels: int = 4,
    cpu_probe: CpuProbe | None = None,
) -> LoadResult:
    """Callers share ``channels`` clients (connections), round-robin per call."""
    check_loopback(target.address)
    if target.datatype == "UINT8":
        payloads = as_tensors(images, target.shape[1], target.shape[2])
    else:
        payloads = [np.array([image], dtype=np.object_).reshape(target.shape) for image in images]
    inputs = []
    for payload in payloads:  # built once: the generator spends its CPU on the wire
        tensor = triton.InferInput(target.input_name, list(target.shape), target.datatype)
        tensor.set_data_from_numpy(payload)
        inputs.append(tensor)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    # A connection per client: equal channel arguments would share one.
    options = [
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    clients = [
        triton.InferenceServerClient(target.address, channel_args=options) for _ in range(channels)
    ]
    try:
        started = time.perf_counter()
        measure_from, stop_at = started + warmup, started + warmup + seconds
        cpu = CpuWindow(cpu_probe, measure_from, stop_at)

        async def caller(k: int) -> None:
            i = k
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                try:
                    await clients[i % channels].infer(
                        target.model, [inputs[i % len(inputs)]], client_timeout=timeout
                    )
                    code = "OK"
                except Exception as exc:  # tritonclient raises its own exception type
                    code = type(exc).__name__
                end = time.perf_counter()
                if sent >= measure_from and end <= stop_at:
                    if code == "OK":
                        latencies.append(end - sent)
                    else:
                        errors[code] = errors.get(code, 0) + 1
                i += concurrency

        await asyncio.gather(*(caller(k) for k in range(concurrency)))
        cpu_ms = await cpu.ms_per_image(len(latencies))
    finally:
        for client in clients:
            await client.close()
    ok = len(latencies)
    return LoadResult(
        mode="closed",
        concurrency=concurrency,
        target_rate=None,
        images_per_request=1,
        seconds=seconds,
        requests=ok,
        images=ok,
        requests_per_s=ok / seconds,
        images_per_s=ok / seconds,
        latency_ms=percentiles(latencies),
        errors=errors,
        cpu_ms_per_image=cpu_ms,
    )
