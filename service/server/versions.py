"""A model version as the server holds it: its state, the fingerprint of its file, its
runner and batcher, and the hooks that put its batcher's numbers into the metrics."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from service.model.runner import Runner
from service.model.spec import ModelSpec
from service.server.batching import BatcherHooks, BatchTiming, DynamicBatcher
from service.server.metrics import Metrics
from service.server.tracing import current as current_tracing


class VersionState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"


@dataclass(frozen=True)
class Fingerprint:
    """What identifies one state of a model file; any change means "load it again"."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> Fingerprint | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(eq=False)
class ModelVersion:
    name: str
    version: int
    path: Path
    fingerprint: Fingerprint | None = None
    state: VersionState = VersionState.LOADING
    runner: Runner | None = None
    batcher: DynamicBatcher | None = None
    error: str | None = None
    # For a READY version whose file changed and no longer loads: that file's fingerprint,
    # so it is not retried until it changes again.
    error_fingerprint: Fingerprint | None = None
    active: int = 0  # calls holding a lease on this version
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def spec(self) -> ModelSpec:
        assert self.runner is not None, "only loaded versions have a spec"
        return self.runner.spec

    async def drained(self) -> None:
        """Return once no call holds a lease on this version."""
        while self.active:
            self._idle.clear()
            await self._idle.wait()


class MetricHooks(BatcherHooks):
    def __init__(self, metrics: Metrics, name: str, version: str):
        self.metrics, self.name, self.version = metrics, name, version

    def queued(self, pending: int) -> None:
        self.metrics.child(self.metrics.pending_images, self.name, self.version).set(pending)

    def dropped(self, reason: str, count: int) -> None:
        self.metrics.child(self.metrics.dropped_images, self.name, self.version, reason).inc(count)

    def batch_done(
        self, size: int, dispatched: float, timing: BatchTiming, waits: Sequence[float]
    ) -> Any:
        """The batch's metrics, and its trace span when tracing is on (its context)."""
        m, name, version = self.metrics, self.name, self.version
        m.child(m.batch_size, name, version).observe(size)
        m.child(m.inference_duration, name, version).observe(timing.total)
        for wait in waits:
            m.queue_duration.observe(wait)
        batch = str(size)
        m.child(m.batch_executions, name, version, batch).inc()
        for stat, seconds in (
            ("compute_input", timing.input),
            ("compute_infer", timing.infer),
            ("compute_output", timing.output),
        ):
            m.child(m.batch_stats_seconds, name, version, batch, stat).inc(seconds)
        tracing = current_tracing()
        if tracing is None:
            return None
        return tracing.record_batch(name, version, size, dispatched, dispatched + timing.total)
