"""Load generator for our gRPC API: closed loop (N callers) or open loop (Poisson arrivals).

Requests are serialised once up front and sent through a raw unary-unary call (bytes in,
bytes out), so the generator spends its CPU on the network and not on protobuf: it shares
the machine with the server it measures. Latency in open loop is counted from each
request's scheduled time, so a slow server cannot hide its queueing (no coordinated
omission). Only loopback targets are accepted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from service.client import channel_options
from service.proto_gen.classifier.v1 import classifier_pb2 as pb

LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}
METHODS = {
    "classify": "/classifier.v1.ImageClassifier/Classify",
    "localize": "/classifier.v1.ImageClassifier/Localize",
}
STREAM_METHOD = "/classifier.v1.ImageClassifier/Stream"


@dataclass
class LoadResult:
    mode: str
    concurrency: int | None
    target_rate: float | None
    images_per_request: int
    seconds: float
    requests: int
    images: int
    requests_per_s: float
    images_per_s: float
    latency_ms: dict[str, float]
    errors: dict[str, int] = field(default_factory=dict)
    # The server's CPU per answered image in the measured window (``cpu_probe``).
    cpu_ms_per_image: float | None = None
    # How busy the whole machine was in that window (every core, load generator included):
    # near 100, a faster server can only take CPU from the client.
    machine_busy_percent: float | None = None

    def summary(self) -> str:
        lat = self.latency_ms
        errors = sum(self.errors.values())
        load = f"c={self.concurrency}" if self.mode == "closed" else f"rate={self.target_rate}/s"
        cpu = "" if self.cpu_ms_per_image is None else f"  cpu {self.cpu_ms_per_image:.2f} ms/img"
        if self.machine_busy_percent is not None:
            cpu += f"  machine {self.machine_busy_percent:.0f}% busy"
        return (
            f"{self.mode} {load} x{self.images_per_request}: {self.images_per_s:.1f} img/s "
            f"{self.requests_per_s:.1f} req/s  p50 {lat.get('p50', 0):.2f} ms  "
            f"p90 {lat.get('p90', 0):.2f}  p99 {lat.get('p99', 0):.2f}  "
            f"max {lat.get('max', 0):.2f}  errors {errors}{cpu}"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))


CpuProbe = Callable[[], float]  # CPU seconds the measured server has used so far


def machine_ticks(stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(busy, total) clock ticks of every core since boot; None where /proc is absent."""
    try:
        fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user and nice
    return total - idle, total


class CpuWindow:
    """The server's CPU seconds, and how busy the whole machine was, over the measured
    window: sampled when the warm-up ends and when the window closes (or when the load
    stops first)."""

    def __init__(self, probe: CpuProbe | None, measure_from: float, stop_at: float):
        self.probe = probe
        self._start: float | None = None
        self._end: float | None = None
        self._ticks: list[tuple[int, int] | None] = []
        self._task = asyncio.get_running_loop().create_task(self._sample(measure_from, stop_at))

    def _take(self) -> float | None:
        self._ticks.append(machine_ticks())
        return self.probe() if self.probe is not None else None

    async def _sample(self, measure_from: float, stop_at: float) -> None:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        self._start = self._take()
        await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
        self._end = self._take()

    def _close(self) -> None:
        if not self._task.done():
            self._task.cancel()
            if self._ticks:  # the load stopped inside the window: close it now
                self._end = self._take()

    async def ms_per_image(self, images: int) -> float | None:
        self._close()
        if self._start is None or self._end is None or images == 0:
            return None
        return round((self._end - self._start) * 1000 / images, 3)

    def machine_busy_percent(self) -> float | None:
        self._close()
        if len(self._ticks) < 2 or self._ticks[0] is None or self._ticks[-1] is None:
            return None
        (busy0, total0), (busy1, total1) = self._ticks[0], self._ticks[-1]
        return round(100 * (busy1 - busy0) / (total1 - total0), 1) if total1 > total0 else None


def check_loopback(target: str) -> None:
    host = target.rsplit(":", 1)[0]
    if host not in LOOPBACK:
        raise ValueError(f"bench load only targets this machine (localhost); got {target!r}")


def build_requests(
    images: list[bytes], model: str, images_per_request: int, method: str, top_k: int = 5
) -> list[bytes]:
    """One serialised request per starting image, cycling through the images."""
    out = []
    for start in range(len(images)):
        batch = [
            pb.Image(encoded=images[(start + i) % len(images)]) for i in range(images_per_request)
        ]
        request: Any = (pb.LocalizeRequest if method == "localize" else pb.ClassifyRequest)(
            model=model, images=batch, top_k=top_k
        )
        out.append(request.SerializeToString())
    return out


def build_stream_requests(
    images: list[bytes], model: str, images_per_request: int, method: str, top_k: int = 5
) -> list[bytes]:
    """``build_requests``, each as one serialised request of a classifier.v1 Stream."""
    out = []
    for n, payload in enumerate(build_requests(images, model, images_per_request, method, top_k)):
        if method == "localize":
            request = pb.StreamRequest(id=str(n), localize=pb.LocalizeRequest.FromString(payload))
        else:
            request = pb.StreamRequest(id=str(n), classify=pb.ClassifyRequest.FromString(payload))
        out.append(request.SerializeToString())
    return out


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    ms = np.array(latencies) * 1000
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
        "mean": float(ms.mean()),
    }


@dataclass
class Window:
    """What a run measures: calls that start and end inside the measured window."""

    measure_from: float
    stop_at: float
    max_requests: int | None
    latencies: list[float]
    errors: dict[str, int] = field(default_factory=dict)
    done: int = 0

    def finished(self) -> bool:
        return time.perf_counter() >= self.stop_at or (
            self.max_requests is not None and self.done >= self.max_requests
        )

    def record(self, sent: float, code: str) -> None:
        end = time.perf_counter()
        if sent >= self.measure_from and end <= self.stop_at:
            self.done += 1
            if code == "OK":
                self.latencies.append(end - sent)
            else:
                self.errors[code] = self.errors.get(code, 0) + 1


async def open_loop(
    send: Callable[[bytes, float], Coroutine[Any, Any, None]],
    requests: list[bytes],
    rate: float,
    seed: int,
    window: Window,
) -> None:
    """Poisson arrivals at ``rate``/s, whatever the answers take."""
    rng = random.Random(seed)
    in_flight: set[asyncio.Task[None]] = set()
    scheduled = time.perf_counter()
    i = 0
    while not window.finished():
        scheduled += rng.expovariate(rate)
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.get_running_loop().create_task(send(requests[i % len(requests)], scheduled))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        i += 1
    if in_flight:
        await asyncio.gather(*in_flight)


async def stream_caller(
    channel: Any, streamed: list[bytes], first: int, step: int, window: Window
) -> None:
    """One closed-loop caller on its own classifier.v1 Stream: a request, its answer, the
    next."""
    call = channel.stream_stream(STREAM_METHOD)()
    i = first
    while not window.finished():
        sent = time.perf_counter()
        await call.write(streamed[i % len(streamed)])
        answer = pb.StreamResponse.FromString(await call.read())
        window.record(sent, answer.error.code if answer.WhichOneof("answer") == "error" else "OK")
        i += step
    await call.done_writing()


async def run_load(
    target: str,
    images: list[bytes],
    *,
    model: str = "",
    concurrency: int | None = 8,
    rate: float | None = None,
    seconds: float = 10.0,
    max_requests: int | None = None,
    warmup: float = 2.0,
    images_per_request: int = 1,
    method: str = "classify",
    timeout: float = 30.0,
    seed: int = 0,
    channels: int = 4,
    cpu_probe: CpuProbe | None = None,
    latencies_out: list[float] | None = None,
    stream: bool = False,
) -> LoadResult:
    """Closed loop when ``rate`` is None (``concurrency`` callers), else open loop. Calls go
    round-robin over ``channels`` connections, as the SDK's do (a server's workers share
    its port, and the kernel balances connections). ``latencies_out`` receives every
    measured latency. ``stream`` (closed loop): each caller opens one classifier.v1
    ``Stream`` and sends its requests on it, one at a time."""
    check_loopback(target)
    requests = build_requests(images, model, images_per_request, method)
    latencies: list[float] = [] if latencies_out is None else latencies_out
    options = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]
    pool = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    try:
        calls = [channel.unary_unary(METHODS[method]) for channel in pool]
        for channel in pool:
            await channel.channel_ready()
        turn = itertools.cycle(calls)
        measure_from = time.perf_counter() + warmup
        stop_at = measure_from + seconds
        window = Window(measure_from, stop_at, max_requests, latencies)
        cpu = CpuWindow(cpu_probe, measure_from, stop_at)

        async def one(payload: bytes, sent: float) -> None:
            try:
                await next(turn)(payload, timeout=timeout)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            window.record(sent, code)

        async def caller(k: int) -> None:
            i = k
            while not window.finished():
                await one(requests[i % len(requests)], time.perf_counter())
                i += concurrency or 1

        callers = range(concurrency or 1)
        if rate is not None:
            await open_loop(one, requests, rate, seed, window)
        elif stream:
            streamed = build_stream_requests(images, model, images_per_request, method)
            await asyncio.gather(
                *(
                    stream_caller(pool[k % channels], streamed, k, len(callers), window)
                    for k in callers
                )
            )
        else:
            await asyncio.gather(*(caller(k) for k in callers))
        elapsed = min(time.perf_counter(), stop_at) - measure_from
        cpu_ms = await cpu.ms_per_image(len(latencies) * images_per_request)
        busy = cpu.machine_busy_percent()
    finally:
        for channel in pool:
            await channel.close()
    errors = window.errors
    ok = len(latencies)
    return LoadResult(
        mode="closed" if rate is None else "open",
        concurrency=concurrency if rate is None else None,
        target_rate=rate,
        images_per_request=images_per_request,
        seconds=round(elapsed, 3),
        requests=ok,
        images=ok * images_per_request,
        requests_per_s=ok / elapsed if elapsed > 0 else 0.0,
        images_per_s=ok * images_per_request / elapsed if elapsed > 0 else 0.0,
        latency_ms=percentiles(latencies),
        errors=errors,
        cpu_ms_per_image=cpu_ms,
        machine_busy_percent=busy,
    )
