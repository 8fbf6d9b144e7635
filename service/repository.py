"""The model repository: ``<root>/<name>/<version>/model.onnx`` → ready model versions.

Discovery picks versions by policy (latest | all | specific) for all models found or a
configured list. Each version is loaded in a worker thread (ONNX Runtime session, graph
checked against its ModelSpec, warm-up at the batch sizes the batcher will use) and only
then gets a batcher and turns READY. A version that fails to load is FAILED — logged,
counted, visible in ListModels — and never stops the others. With polling on, new
versions are loaded and vanished ones drained and unloaded while the server runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from service.batching import BatcherConfig, BatcherHooks, DynamicBatcher
from service.config import Settings
from service.errors import InvalidArgumentError, NotFoundError, UnavailableError
from service.metrics import Metrics
from service.model_spec import ModelSpec
from service.runner import Runner

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


class VersionState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ModelVersion:
    name: str
    version: int
    path: Path
    state: VersionState = VersionState.LOADING
    runner: Runner | None = None
    batcher: DynamicBatcher | None = None
    error: str | None = None

    @property
    def spec(self) -> ModelSpec:
        assert self.runner is not None, "only loaded versions have a spec"
        return self.runner.spec


class _MetricHooks(BatcherHooks):
    def __init__(self, metrics: Metrics, name: str, version: str):
        self.metrics, self.labels = metrics, {"model": name, "version": version}

    def queued(self, pending: int) -> None:
        self.metrics.pending_images.labels(**self.labels).set(pending)

    def dropped(self, reason: str, count: int) -> None:
        self.metrics.dropped_images.labels(**self.labels, reason=reason).inc(count)

    def batch_done(self, size: int, seconds: float, waits: Sequence[float]) -> None:
        self.metrics.batch_size.labels(**self.labels).observe(size)
        self.metrics.inference_duration.labels(**self.labels).observe(seconds)
        for wait in waits:
            self.metrics.queue_duration.observe(wait)


def discover(root: Path) -> dict[str, list[int]]:
    """Model name → sorted versions that have a model file."""
    found: dict[str, list[int]] = {}
    if not root.is_dir():
        return found
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if model_dir.name.startswith("."):
            continue
        versions = sorted(
            int(v.name)
            for v in model_dir.iterdir()
            if v.is_dir() and v.name.isdigit() and (v / MODEL_FILE).is_file()
        )
        if versions:
            found[model_dir.name] = versions
    return found


class ModelRepository:
    def __init__(self, settings: Settings, metrics: Metrics, executor: Executor):
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.root = Path(settings.model_repository)
        self._versions: dict[str, dict[int, ModelVersion]] = {}
        self._missing: dict[str, str] = {}  # configured but absent → why
        self._poller: asyncio.Task[None] | None = None
        self.on_change: Callable[[], Awaitable[None]] | None = None  # after each rescan

    # --- selection ----------------------------------------------------------------------

    def wanted(self, found: dict[str, list[int]]) -> list[tuple[str, int]]:
        s = self.settings
        names = s.models or sorted(found)
        selected: list[tuple[str, int]] = []
        self._missing = {}
        for name in names:
            versions = found.get(name, [])
            if not versions:
                self._missing[name] = f"no {name}/<version>/{MODEL_FILE} in {self.root}"
                continue
            if s.version_policy == "latest":
                chosen = versions[-1:]
            elif s.version_policy == "all":
                chosen = versions
            else:
                asked = s.versions.get(name, [])
                chosen = [v for v in asked if v in versions]
                absent = sorted(set(asked) - set(versions))
                if absent:
                    self._missing[name] = f"versions {absent} not in {self.root / name}"
            selected.extend((name, v) for v in chosen)
        return selected

    # --- loading ------------------------------------------------------------------------

    async def load(self) -> None:
        """Load what the policy selects and is not loaded yet; unload what it dropped."""
        wanted = self.wanted(discover(self.root))
        for name, reason in self._missing.items():
            log.error("model %s cannot be served: %s", name, reason)
            self.metrics.model_load_failures.labels(model=name).inc()
        wanted_set = set(wanted)
        for name, versions in list(self._versions.items()):
            for version in list(versions):
                if (name, version) not in wanted_set:
                    await self._unload(name, version)
        for name, version in wanted:
            if version not in self._versions.get(name, {}):
                await self._load(name, version)

    async def _load(self, name: str, version: int) -> None:
        entry = ModelVersion(name, version, self.root / name / str(version) / MODEL_FILE)
        self._versions.setdefault(name, {})[version] = entry
        started = time.monotonic()
        try:
            entry.runner = await asyncio.to_thread(self._open, entry.path)
        except Exception as exc:
            entry.state, entry.error = VersionState.FAILED, str(exc)
            self.metrics.model_load_failures.labels(model=name).inc()
            log.error("model %s version %d failed to load: %s", name, version, exc)
            return
        s = self.settings
        max_batch = min(s.max_batch_size, entry.runner.max_batch_size or s.max_batch_size)
        config = BatcherConfig(
            max_batch_size=max_batch,
            max_queue_delay_us=s.max_queue_delay_us,
            preferred_batch_sizes=tuple(b for b in s.preferred_batch_sizes if b <= max_batch),
            max_queue_size=s.max_queue_size,
            concurrency=s.instances,
        )
        entry.batcher = DynamicBatcher(
            f"{name}/{version}",
            entry.runner.run,
            config,
            self.executor,
            _MetricHooks(self.metrics, name, str(version)),
        )
        entry.batcher.start()
        entry.state = VersionState.READY
        seconds = time.monotonic() - started
        self.metrics.model_load_duration.labels(model=name).observe(seconds)
        self.metrics.model_ready.labels(model=name, version=str(version)).set(1)
        log.info(
            "model %s version %d ready in %.2f s (providers %s, max batch %d)",
            name,
            version,
            seconds,
            entry.runner.active_providers,
            max_batch,
        )

    def _open(self, path: Path) -> Runner:
        runner = Runner(path, self.settings.runner_options())
        s = self.settings
        limit = min(s.max_batch_size, runner.max_batch_size or s.max_batch_size)
        sizes = sorted({1, limit, *[b for b in s.preferred_batch_sizes if b <= limit]})
        runner.warmup(sizes)
        log.info("warmed up %s at batch sizes %s", path, sizes)
        return runner

    async def _unload(self, name: str, version: int) -> None:
        entry = self._versions[name].pop(version)
        if not self._versions[name]:
            del self._versions[name]
        self.metrics.model_ready.labels(model=name, version=str(version)).set(0)
        if entry.batcher is not None:
            await entry.batcher.close()  # answers what was queued before it goes
        log.info("model %s version %d unloaded", name, version)

    def start_polling(self) -> None:
        interval = self.settings.repository_poll_seconds
        if interval > 0 and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(interval))

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.load()
                if self.on_change is not None:
                    await self.on_change()
            except Exception:
                log.exception("repository rescan failed")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for name, versions in list(self._versions.items()):
            for version in list(versions):
                await self._unload(name, version)

    # --- lookup -------------------------------------------------------------------------

    def all_versions(self) -> list[ModelVersion]:
        return [v for versions in self._versions.values() for v in versions.values()]

    def ready_versions(self) -> list[ModelVersion]:
        return [v for v in self.all_versions() if v.state is VersionState.READY]

    def resolve(self, name: str, version: str) -> ModelVersion:
        """The version a request names (empty: newest ready); NOT_FOUND or UNAVAILABLE."""
        if not name:
            ready_names = sorted({v.name for v in self.ready_versions()})
            if len(ready_names) != 1:
                raise InvalidArgumentError(
                    "model is required when the server has several models; it has: "
                    + (", ".join(sorted(self._versions)) or "none")
                )
            name = ready_names[0]
        versions = self._versions.get(name)
        if not versions:
            raise NotFoundError(
                f"unknown model {name!r}; this server has: "
                + (", ".join(sorted(self._versions)) or "no models")
            )
        if not version:
            ready = [v for v in versions.values() if v.state is VersionState.READY]
            if ready:
                return max(ready, key=lambda v: v.version)
            states = {v.version: v.state.value for v in versions.values()}
            raise UnavailableError(f"model {name!r} has no ready version (versions: {states})")
        if not version.isdigit():
            raise InvalidArgumentError(f"version must be a number, got {version!r}")
        entry = versions.get(int(version))
        if entry is None:
            raise NotFoundError(
                f"model {name!r} has no version {version}; loaded versions: "
                + ", ".join(str(v) for v in sorted(versions))
            )
        if entry.state is VersionState.LOADING:
            raise UnavailableError(f"model {name!r} version {version} is still loading")
        if entry.state is VersionState.FAILED:
            raise UnavailableError(
                f"model {name!r} version {version} failed to load: {entry.error}"
            )
        return entry
