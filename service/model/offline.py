"""The in-process inference pipeline: decode in a thread pool, batch, run, in order.

The same preprocess and runner code the server uses, without gRPC or the dynamic batcher:
used to evaluate exported models, by the local batch-scoring engine and by the benchmark's
in-process limit. Decoding of the next batches runs in worker threads while the current
batch is in ONNX Runtime (both release the GIL), and results come back in input order.
A bad image yields an outcome with an error; it never stops the stream.

With GPU decoding on the runner (``runner.device_preprocessor``), each batch's images are
decoded together on the device in one worker task, and what it cannot take goes through
the CPU path in the same task.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.model.cores import cpu_count
from service.model.errors import ServiceError
from service.model.geometry import Geometry
from service.model.gpu_decode import DevicePreprocessor
from service.model.image_header import ImageLimits
from service.model.preprocess import preprocess_encoded
from service.model.runner import Runner
from service.model.spec import ModelSpec

Source = bytes | str | Path


@dataclass
class Outcome:
    """One input's result: model outputs (one row each) and the geometry, or an error."""

    index: int
    geometry: Geometry | None = None
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None


def _read(source: Source) -> bytes:
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as handle:
        return handle.read()


def _prepare(
    source: Source, spec: ModelSpec, limits: ImageLimits
) -> tuple[np.ndarray, Geometry] | str:
    try:
        return preprocess_encoded(_read(source), spec, limits)
    except ServiceError as exc:
        return exc.message
    except OSError as exc:
        return f"cannot read {source!s}: {exc.strerror or exc}"


Prepared = tuple[Any, Geometry] | str  # (host pixels or a device row, geometry) or an error


def _prepare_batch_on_device(
    device: DevicePreprocessor, sources: list[Source], spec: ModelSpec, limits: ImageLimits
) -> list[Prepared]:
    datas: list[bytes | None] = []
    out: list[Prepared | None] = []
    for source in sources:
        try:
            datas.append(_read(source))
            out.append(None)
        except OSError as exc:
            datas.append(None)
            out.append(f"cannot read {source!s}: {exc.strerror or exc}")
    readable = [i for i, data in enumerate(datas) if data is not None]
    outcomes = device.prepare([datas[i] for i in readable], limits, indices=readable)  # type: ignore[misc]
    for i, outcome in zip(readable, outcomes, strict=True):
        if isinstance(outcome, ServiceError):
            out[i] = outcome.message
        elif outcome is not None:
            out[i] = outcome
        else:
            out[i] = _prepare(datas[i], spec, limits)  # type: ignore[arg-type]
    return out  # type: ignore[return-value]


def _run_on_device(
    runner: Runner,
    device: DevicePreprocessor,
    sources: Iterable[Source],
    batch_size: int,
    limits: ImageLimits,
    threads: int,
    prefetch_batches: int,
    on_batch: Callable[[int], None] | None,
) -> Iterator[Outcome]:
    pending: deque[tuple[int, Future[list[Prepared]]]] = deque()
    iterator = iter(sources)
    start = 0
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        while True:
            while len(pending) <= prefetch_batches:
                chunk = list(itertools.islice(iterator, batch_size))
                if not chunk:
                    break
                future = pool.submit(_prepare_batch_on_device, device, chunk, runner.spec, limits)
                pending.append((start, future))
                start += len(chunk)
            if not pending:
                return
            first, future = pending.popleft()
            items = future.result()
            yield from _infer(runner, list(enumerate(items, start=first)))
            if on_batch is not None:
                on_batch(len(items))


def run_pipeline(
    runner: Runner,
    sources: Iterable[Source],
    *,
    batch_size: int = 32,
    limits: ImageLimits | None = None,
    decode_threads: int | None = None,
    prefetch_batches: int = 2,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[Outcome]:
    """Yield one ``Outcome`` per source, in order."""
    limits = limits or ImageLimits()
    threads = decode_threads or cpu_count()
    if runner.device_preprocessor is not None:
        yield from _run_on_device(
            runner,
            runner.device_preprocessor,
            sources,
            batch_size,
            limits,
            threads,
            prefetch_batches,
            on_batch,
        )
        return
    window = batch_size * (prefetch_batches + 1)
    pending: deque[tuple[int, Future[Prepared]]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        iterator = enumerate(sources)
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                try:
                    index, source = next(iterator)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((index, pool.submit(_prepare, source, runner.spec, limits)))
            if not pending:
                return
            take = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            yield from _infer(runner, [(i, f.result()) for i, f in take])
            if on_batch is not None:
                on_batch(len(take))


def _infer(runner: Runner, items: list[tuple[int, Prepared]]) -> Iterator[Outcome]:
    good = [(i, r) for i, r in items if not isinstance(r, str)]
    results: dict[int, Outcome] = {i: Outcome(i, error=r) for i, r in items if isinstance(r, str)}
    if good:
        try:
            outputs = runner.run_items([r[0] for _, r in good])
        except ServiceError as exc:
            for i, _ in good:
                results[i] = Outcome(i, error=exc.message)
        else:
            for row, (i, (_, geometry)) in enumerate(good):
                results[i] = Outcome(
                    i, geometry=geometry, outputs={k: v[row] for k, v in outputs.items()}
                )
    for i, _ in items:
        yield results[i]
