"""Closed-loop load over the Open Inference Protocol with the real tritonclient (gRPC aio):
one encoded JPEG per request, as a BYTES tensor. The same client drives our server and
the Triton peer, so the report compares servers, not clients.

``--payload tensor`` sends each image instead as a UINT8 ``[1, H, W, 3]`` tensor: the
model input the server itself would make of it (``service.model.preprocess`` with the model's
spec, from GetModel), made once before the run. The server then neither decodes nor
resizes, so what is measured is the wire, the batcher and the model — on a
GPU, the figure to hold against inference-only results such as MLPerf's.

Ours takes ``image_bytes`` of shape ``[1]``; the PyTriton peer takes ``IMAGE`` of shape
``[1, 1]`` and calls its model ``model`` (see ../shared/peers/pytriton/README.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton

from bench.load import CpuProbe, CpuWindow, LoadResult, check_loopback, percentiles
from service.client import ClassifierClient
from service.model.image_header import ImageLimits
from service.model.preprocess import preprocess_encoded
from service.model.spec import ModelSpec


@dataclass(frozen=True)
class OipTarget:
    address: str
    model: str
    input_name: str
    shape: tuple[int, ...]  # of one image's part of a request's tensor (batch axis first)
    datatype: str = "BYTES"
    spec: ModelSpec | None = None  # UINT8: the model whose input the images become


def ours(address: str, model: str) -> OipTarget:
    return OipTarget(address, model, "image_bytes", (1,))


def ours_tensor(address: str, model: str) -> OipTarget:
    """Our server's UINT8 input for ``model``: named and sized by the model's spec."""
    with ClassifierClient(address, channels=1) as client:
        spec = ModelSpec.from_json(client.get_model(model).model_spec_json)
    shape = (1, spec.input.height, spec.input.width, 3)
    return OipTarget(address, model, spec.input.name, shape, "UINT8", spec)


def pytriton_peer(address: str) -> OipTarget:
    return OipTarget(address, "model", "IMAGE", (1, 1))


def request_inputs(target: OipTarget, images: Sequence[bytes], n: int) -> list[Any]:
    """One input tensor per starting image, of ``n`` images each (built once: the load
    generator spends its CPU on the wire)."""
    if target.spec is not None:
        limits = ImageLimits()
        one = [preprocess_encoded(image, target.spec, limits)[0][None] for image in images]
    else:
        one = [np.array([image], dtype=np.object_).reshape(target.shape) for image in images]
    inputs = []
    for start in range(len(one)):
        payload = np.concatenate([one[(start + i) % len(one)] for i in range(n)])
        shape = [n * target.shape[0], *target.shape[1:]]
        tensor = triton.InferInput(target.input_name, shape, target.datatype)
        tensor.set_data_from_numpy(payload)
        inputs.append(tensor)
    return inputs


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
    images_per_request: int = 1,
    latencies_out: list[float] | None = None,
    stream: bool = False,
) -> LoadResult:
    """Callers share ``channels`` clients (connections), round-robin per call. With
    ``images_per_request`` > 1 each request carries that many images along the batch axis
    (consecutive images, cycling). ``latencies_out`` receives every measured latency.
    ``stream``: each caller opens one ModelStreamInfer stream and sends its requests on
    it, one at a time (closed loop, as the unary callers), instead of a call each."""
    check_loopback(target.address)
    n = images_per_request
    inputs = request_inputs(target, images, n)
    latencies: list[float] = [] if latencies_out is None else latencies_out
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

        async def stream_caller(k: int) -> None:
            requests: asyncio.Queue[dict[str, object] | None] = asyncio.Queue()

            async def sent_requests() -> AsyncIterator[dict[str, object]]:
                while (request := await requests.get()) is not None:
                    yield request

            answers = clients[k % channels].stream_infer(sent_requests()).__aiter__()
            i = k
            try:
                while time.perf_counter() < stop_at:
                    sent = time.perf_counter()
                    await requests.put(
                        {"model_name": target.model, "inputs": [inputs[i % len(inputs)]]}
                    )
                    _, error = await answers.__anext__()
                    end = time.perf_counter()
                    if sent >= measure_from and end <= stop_at:
                        if error is None:
                            latencies.append(end - sent)
                        else:
                            errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
                    i += concurrency
            finally:
                await requests.put(None)  # the client closes its side; the stream ends
                async for _ in answers:
                    pass

        callers = stream_caller if stream else caller
        await asyncio.gather(*(callers(k) for k in range(concurrency)))
        cpu_ms = await cpu.ms_per_image(len(latencies) * n)
        busy = cpu.machine_busy_percent()
    finally:
        for client in clients:
            await client.close()
    ok = len(latencies)
    return LoadResult(
        mode="closed",
        concurrency=concurrency,
        target_rate=None,
        images_per_request=n,
        seconds=seconds,
        requests=ok,
        images=ok * n,
        requests_per_s=ok / seconds,
        images_per_s=ok * n / seconds,
        latency_ms=percentiles(latencies),
        errors=errors,
        cpu_ms_per_image=cpu_ms,
        machine_busy_percent=busy,
    )
