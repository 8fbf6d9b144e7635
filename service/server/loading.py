"""Turning published files into servable versions: which versions the policy serves; wait
until a file stops changing; open it (ONNX Runtime session, graph checked against its
ModelSpec, warm-up at every batch size the batcher can form, the GPU decoder if
configured); start its batcher. The repository keeps the state; this module loads."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path

from service.model.gpu_decode import device_preprocessor_for
from service.model.runner import Runner
from service.model.runner_options import RunnerOptions
from service.server.batching import BatcherConfig, DynamicBatcher
from service.server.config import Settings
from service.server.versions import Fingerprint, MetricHooks

log = logging.getLogger(__name__)

# A file still changing after this long is left for the next rescan.
SETTLE_GIVE_UP_SECONDS = 30.0


async def select_versions(
    policy: str,
    on_disk: Mapping[int, Path],
    asked: Sequence[int],
    ensure: Callable[[int], Awaitable[bool]],
) -> tuple[set[int], list[int]]:
    """The versions of a model the policy serves, each loaded (``ensure``: True when
    READY), and the versions asked for that are not on disk. ``latest``: the newest that
    loads (a newer one that fails leaves the older one); ``all``: every version on disk;
    ``specific``: those ``asked``."""
    if policy == "latest":
        for version in sorted(on_disk, reverse=True):
            if await ensure(version):
                return {version}, []
        return set(), []
    candidates = sorted(on_disk) if policy == "all" else [v for v in asked if v in on_disk]
    for version in candidates:
        await ensure(version)
    absent = [] if policy == "all" else sorted(set(asked) - set(on_disk))
    return set(candidates), absent


async def settled_fingerprint(
    path: Path, fingerprint: Fingerprint, settle_seconds: float
) -> Fingerprint | None:
    """The fingerprint once the file has stopped changing (None: still changing)."""
    give_up = time.monotonic() + SETTLE_GIVE_UP_SECONDS
    while True:
        age = time.time() - fingerprint.mtime_ns / 1e9
        if age >= settle_seconds:
            return fingerprint
        await asyncio.sleep(settle_seconds - age)
        again = Fingerprint.of(path)
        if again == fingerprint:
            return fingerprint
        if again is None or time.monotonic() > give_up:
            log.warning("%s is still being written; not loaded yet", path)
            return None
        fingerprint = again


def open_runner(path: Path, settings: Settings, options: RunnerOptions) -> Runner:
    """The version's runner, warmed up at every batch size it will run (blocking: call
    it in a thread)."""
    runner = Runner(path, options)
    limit = min(settings.max_batch_size, runner.max_batch_size or settings.max_batch_size)
    sizes = runner.warmup_sizes(limit, settings.preferred_batch_sizes)
    runner.warmup(sizes)
    log.info("warmed up %s at batch sizes %s", path, sizes)
    runner.device_preprocessor = device_preprocessor_for(
        runner, settings.decode_device, settings.image_limits(), settings.gpu_decoders
    )
    return runner


def start_batcher(
    label: str, runner: Runner, settings: Settings, executor: Executor, hooks: MetricHooks
) -> DynamicBatcher:
    """A started batcher for ``runner``, its largest batch the smaller of the setting and
    what the model's graph accepts."""
    s = settings
    max_batch = min(s.max_batch_size, runner.max_batch_size or s.max_batch_size)
    config = BatcherConfig(
        max_batch_size=max_batch,
        max_queue_delay_us=s.max_queue_delay_us,
        preferred_batch_sizes=tuple(b for b in s.preferred_batch_sizes if b <= max_batch),
        max_queue_size=s.max_queue_size,
        concurrency=s.instances,
    )
    batcher = DynamicBatcher(label, runner.run_items, config, executor, hooks)
    batcher.start()
    return batcher
