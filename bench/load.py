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
from collections.abc import Callable
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
) -> LoadResult:
    """Closed loop when ``rate`` is None (``concurrency`` callers), else open loop. Calls go
    round-robin over ``channels`` connections, as the SDK's do (a server's workers share
    its port, and the kernel balances connections). ``latencies_out`` receives every
    measured latency."""
    check_loopback(target)
    requests = build_requests(images, model, images_per_request, method)
    latencies: list[float] = [] if latencies_out is None else latencies_out
    errors: dict[str, int] = {}
    done_in_window = 0
    options = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]
    pool = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    try:
        calls = [channel.unary_unary(METHODS[method]) for channel in pool]
        for channel in pool:
            await channel.channel_ready()
        turn = itertools.cycle(calls)
        started = time.perf_counter()
        measure_from = started + warmup
        stop_at = measure_from + seconds
        cpu = CpuWindow(cpu_probe, measure_from, stop_at)

        def finished() -> bool:
            return time.perf_counter() >= stop_at or (
                max_requests is not None and done_in_window >= max_requests
            )

        async def one(payload: bytes, sent: float) -> None:
            nonlocal done_in_window
            try:
                await next(turn)(payload, timeout=timeout)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            end = time.perf_counter()
            if sent >= measure_from and end <= stop_at:
                done_in_window += 1
                if code == "OK":
                    latencies.append(end - sent)
                else:
                    errors[code] = errors.get(code, 0) + 1

        if rate is None:

            async def caller(k: int) -> None:
                i = k
                while not finished():
                    await one(requests[i % len(requests)], time.perf_counter())
                    i += concurrency or 1

            await asyncio.gather(*(caller(k) for k in range(concurrency or 1)))
        else:
            rng = random.Random(seed)
            in_flight: set[asyncio.Task[None]] = set()
            scheduled = time.perf_counter()
            i = 0
            while not finished():
                scheduled += rng.expovariate(rate)
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.get_running_loop().create_task(
                    one(requests[i % len(requests)], scheduled)
                )
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                i += 1
            if in_flight:
                await asyncio.gather(*in_flight)
        window = min(time.perf_counter(), stop_at) - measure_from
        cpu_ms = await cpu.ms_per_image(len(latencies) * images_per_request)
        busy = cpu.machine_busy_percent()
    finally:
        for channel in pool:
            await channel.close()
    ok = len(latencies)
    return LoadResult(
        mode="closed" if rate is None else "open",
        concurrency=concurrency if rate is None else None,
        target_rate=rate,
        images_per_request=images_per_request,
        seconds=round(window, 3),
        requests=ok,
        images=ok * images_per_request,
        requests_per_s=ok / window if window > 0 else 0.0,
        images_per_s=ok * images_per_request / window if window > 0 else 0.0,
        latency_ms=percentiles(latencies),
        errors=errors,
        cpu_ms_per_image=cpu_ms,
        machine_busy_percent=busy,
    )
