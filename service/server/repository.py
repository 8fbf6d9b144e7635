"""The model repository: ``<root>/<name>/<version>/model.onnx`` → ready versions, swapped
without downtime.

The rules every path here keeps (DESIGN.md, "Model lifecycle"):

* A version is loaded in a worker thread (ONNX Runtime session, graph checked against its
  ModelSpec, warm-up at every batch size the batcher can form) and only then gets a
  batcher and becomes READY. Nothing it replaces is touched before that.
* A replaced version is *retired*: it leaves the lookup at once, so calls that name no
  version move to its replacement at one instant, and it is unloaded only when every call
  that leased it has been answered.
* A version that fails to load (corrupt file, bad ModelSpec, ORT error, warm-up failure)
  never displaces a working one. The failure is recorded with the file's fingerprint
  (size, mtime, inode), shown in ListModels/GetModel, counted and logged once, and the
  load is retried only when the fingerprint changes.
* Publishing is "write ``<name>/.<anything>/model.onnx``, then rename the folder to
  ``<name>/<version>``": dot-folders are never read, and a file modified within
  ``repository_settle_seconds`` is watched until it stops changing before it is loaded.

Policies (``loading.select_versions``): ``latest``, ``all``, ``specific``.

Explicit control (the Open Inference Protocol's repository extension): ``load_model``
rescans one model now (new versions swap in by the rules above) and serves it even if
``models`` did not list it; ``unload_model`` retires all its versions and keeps it
unloaded, rescans included, until it is loaded again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from pathlib import Path

from service.model.errors import InvalidArgumentError, NotFoundError, UnavailableError
from service.model.layout import MODEL_FILE, scan
from service.model.runner_options import RunnerOptions
from service.server.config import Settings
from service.server.loading import (
    open_runner,
    select_versions,
    settled_fingerprint,
    start_batcher,
)
from service.server.metrics import Metrics
from service.server.traffic import TrafficSplit
from service.server.versions import (
    Fingerprint,
    MetricHooks,
    ModelVersion,
    VersionState,
)

log = logging.getLogger(__name__)


class ModelRepository:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        executor: Executor,
        runner_options: RunnerOptions | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.runner_options = runner_options or settings.runner_options()
        self.root = Path(settings.model_repository)
        self._versions: dict[str, dict[int, ModelVersion]] = {}  # READY: what calls see
        self._loading: dict[tuple[str, int], ModelVersion] = {}
        self._failures: dict[tuple[str, int], ModelVersion] = {}  # FAILED, no READY twin
        self._retiring: set[ModelVersion] = set()
        self._unloads: set[asyncio.Task[None]] = set()
        self._missing: dict[str, str] = {}  # configured but absent → why
        self._known: set[str] = set()  # model names with series in the metrics
        self._added: set[str] = set()  # loaded explicitly, beyond settings.models
        self._unloaded: set[str] = set()  # unloaded explicitly: not served, not rescanned
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self.on_change: Callable[[], Awaitable[None]] | None = None  # after each rescan
        self.traffic = TrafficSplit(self.root, settings.version_weights)

    # --- reconciling the repository with what is served ------------------------------

    async def load(self) -> None:
        """Bring what is served in line with the repository and the policy (one rescan)."""
        async with self._lock:
            on_disk = scan(self.root)
            names = self.selected_names(on_disk)
            missing: dict[str, str] = {}
            for name in names:
                if name not in self._known:
                    self._known.add(name)
                    self.metrics.model_known(name)
                versions = on_disk.get(name, {})
                if not versions:
                    missing[name] = f"no {name}/<version>/{MODEL_FILE} in {self.root}"
                await self._reconcile(name, versions, missing)
            for name in list(self._versions):
                if name not in names:  # the whole model left the repository
                    for entry in list(self._versions[name].values()):
                        self._retire(entry)
            for key in list(self._failures):
                name, version = key
                if name not in names or version not in on_disk.get(name, {}):
                    del self._failures[key]
                    self.metrics.forget_version(name, str(version))
            for name in self._known - set(names):
                if name not in self._versions and not any(e.name == name for e in self._retiring):
                    self._known.discard(name)
                    self.metrics.forget_model(name)
            for name, reason in missing.items():
                if self._missing.get(name) != reason:
                    log.error("model %s cannot be served: %s", name, reason)
            self._missing = missing

    def selected_names(self, on_disk: dict[str, dict[int, Path]]) -> list[str]:
        names = set(self.settings.models or on_disk) | self._added
        return sorted(names - self._unloaded)

    async def load_model(self, name: str) -> list[ModelVersion]:
        """Rescan and serve one model now; its versions afterwards (ready or failed)."""
        if name not in scan(self.root):
            raise NotFoundError(f"no {name}/<version>/{MODEL_FILE} in {self.root}")
        self._unloaded.discard(name)
        if self.settings.models and name not in self.settings.models:
            self._added.add(name)
        await self.load()
        return [e for e in self.all_versions() if e.name == name]

    async def unload_model(self, name: str) -> None:
        """Retire every version of ``name`` and keep it unloaded until ``load_model``."""
        if name not in self._known and name not in scan(self.root):
            raise NotFoundError(f"unknown model {name!r}")
        self._unloaded.add(name)
        self._added.discard(name)
        await self.load()

    async def _reconcile(
        self, name: str, on_disk: dict[int, Path], missing: dict[str, str]
    ) -> None:
        async def ensure(version: int) -> bool:
            return await self._ensure(name, version, on_disk[version])

        asked = self.settings.versions.get(name, [])
        selected, absent = await select_versions(
            self.settings.version_policy, on_disk, asked, ensure
        )
        if absent:
            missing[name] = f"versions {absent} not in {self.root / name}"
        served = self._versions.get(name, {})
        replacement_ready = any(v in served for v in selected)
        for version, entry in list(served.items()):
            if version in selected:
                continue
            # Retire only what something ready replaces (or what left the disk with its
            # whole model): a failed newer version never takes the old one down.
            if replacement_ready or not on_disk:
                self._retire(entry)
            elif version not in on_disk:
                log.warning(
                    "model %s version %d left the repository but stays served: no other "
                    "version of the model is ready",
                    name,
                    version,
                )

    async def _ensure(self, name: str, version: int, path: Path) -> bool:
        """Load ``name/version`` if it is new or its file changed; True when it is READY."""
        current = self._versions.get(name, {}).get(version)
        fingerprint = Fingerprint.of(path)
        if fingerprint is None:  # vanished since the scan
            return current is not None
        if current is not None and current.fingerprint == fingerprint:
            current.error = current.error_fingerprint = None  # back to the file it serves
            return True
        failed = self._failures.get((name, version))
        if current is not None and current.error_fingerprint == fingerprint:
            return True  # a changed file that already failed; the old one keeps serving
        if failed is not None and failed.fingerprint == fingerprint:
            return False  # known bad; retried when the file changes
        settled = await settled_fingerprint(
            path, fingerprint, self.settings.repository_settle_seconds
        )
        if settled is None:
            return current is not None
        loaded = await self._load(name, version, path, settled)
        if loaded is None:
            return current is not None
        if current is not None:
            log.info("model %s version %d: its file changed; reloaded", name, version)
            self._retire(current)
        self._versions.setdefault(name, {})[version] = loaded
        self.metrics.child(self.metrics.model_ready, name, str(version)).set(1)
        return True

    async def _load(
        self, name: str, version: int, path: Path, fingerprint: Fingerprint
    ) -> ModelVersion | None:
        key = (name, version)
        entry = ModelVersion(name, version, path, fingerprint)
        self._loading[key] = entry
        if name not in self._versions or version not in self._versions[name]:
            self.metrics.child(self.metrics.model_ready, name, str(version)).set(0)
        started = time.monotonic()
        try:
            runner = await asyncio.to_thread(open_runner, path, self.settings, self.runner_options)
        except Exception as exc:
            self._record_failure(entry, str(exc))
            return None
        finally:
            del self._loading[key]
        if Fingerprint.of(path) != fingerprint:
            # Replaced while it loaded: what was loaded may be neither file. Next rescan.
            log.info("%s changed while it loaded; it is loaded again on the next rescan", path)
            return None
        entry.runner = runner
        entry.batcher = start_batcher(
            f"{name}/{version}",
            runner,
            self.settings,
            self.executor,
            MetricHooks(self.metrics, name, str(version)),
        )
        entry.state = VersionState.READY
        self._failures.pop(key, None)
        seconds = time.monotonic() - started
        self.metrics.child(self.metrics.model_load_duration, name).observe(seconds)
        log.info(
            "model %s version %d ready in %.2f s (providers %s, max batch %d)",
            name,
            version,
            seconds,
            runner.active_providers,
            entry.batcher.config.max_batch_size,
        )
        return entry

    def _record_failure(self, entry: ModelVersion, error: str) -> None:
        name, version = entry.name, entry.version
        self.metrics.child(self.metrics.model_load_failures, name).inc()
        current = self._versions.get(name, {}).get(version)
        if current is not None:
            # The file of a ready version changed and the new one does not load: keep
            # serving the old one, and say so.
            current.error = f"its file changed and the new file failed to load: {error}"
            current.error_fingerprint = entry.fingerprint
            log.error(
                "model %s version %d: the changed file failed to load (still serving the "
                "previous one): %s",
                name,
                version,
                error,
            )
            return
        entry.state, entry.error = VersionState.FAILED, error
        self._failures[(name, version)] = entry
        self.metrics.child(self.metrics.model_ready, name, str(version)).set(0)
        log.error("model %s version %d failed to load: %s", name, version, error)

    # --- retiring --------------------------------------------------------------------

    def _retire(self, entry: ModelVersion) -> None:
        """Take a version out of the lookup now; unload it once its calls are answered."""
        served = self._versions.get(entry.name, {})
        if served.get(entry.version) is entry:
            del served[entry.version]
            if not served:
                del self._versions[entry.name]
        entry.state = VersionState.UNLOADING
        self._retiring.add(entry)
        task = asyncio.get_running_loop().create_task(self._unload_when_drained(entry))
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _unload_when_drained(self, entry: ModelVersion) -> None:
        await entry.drained()
        if entry.batcher is not None:
            await entry.batcher.close()  # nothing is queued by now; this stops it
        entry.batcher, entry.runner = None, None  # the ORT sessions go with the last ref
        self._retiring.discard(entry)
        key = (entry.name, entry.version)
        if entry.version not in self._versions.get(entry.name, {}) and key not in self._loading:
            self.metrics.forget_version(entry.name, str(entry.version))
        log.info("model %s version %d unloaded", entry.name, entry.version)

    # --- polling ---------------------------------------------------------------------

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
        """Stop polling, retire everything, and wait until it is all unloaded."""
        if self._poller is not None:
            self._poller.cancel()
        for versions in list(self._versions.values()):
            for entry in list(versions.values()):
                self._retire(entry)
        if self._unloads:
            await asyncio.gather(*self._unloads, return_exceptions=True)

    # --- lookup ----------------------------------------------------------------------

    def all_versions(self) -> list[ModelVersion]:
        """Every version the server knows of: ready, loading, failed and unloading."""
        out: dict[tuple[str, int], ModelVersion] = {}
        for versions in self._versions.values():
            for entry in versions.values():
                out[(entry.name, entry.version)] = entry
        for group in (self._loading.values(), self._failures.values(), self._retiring):
            for entry in group:
                out.setdefault((entry.name, entry.version), entry)
        return [out[key] for key in sorted(out)]

    def ready_versions(self) -> list[ModelVersion]:
        return [e for versions in self._versions.values() for e in versions.values()]

    def serving(self) -> bool:
        """Health: every configured model has a ready version (with none configured: at
        least one model does, so one broken model among many does not fail the pod).
        Models unloaded explicitly are not required."""
        if self.settings.models:
            required = set(self.settings.models) - self._unloaded
            return all(self._versions.get(name) for name in required)
        return bool(self._versions)

    def known_names(self) -> set[str]:
        """The model names that may label metrics (served, loading, failed or configured)."""
        return set(self._known)

    def is_served(self, name: str) -> bool:
        """Whether ``name`` is a model of this repository (so it may label metrics)."""
        return name in self._known

    def resolve(self, name: str, version: str) -> ModelVersion:
        """The version a request names (empty: by the traffic split, by default the newest
        ready); NOT_FOUND or UNAVAILABLE."""
        if not name:
            if len(self._versions) != 1:
                raise InvalidArgumentError(
                    "model is required when the server has several models; it has: "
                    + (", ".join(sorted(self._known)) or "none")
                )
            (name,) = self._versions
        served = self._versions.get(name)
        if version and not version.isdigit():
            raise InvalidArgumentError(f"version must be a number, got {version!r}")
        if not served:
            others = {e.version: e.state.value for e in self.all_versions() if e.name == name}
            if others or name in self._known:
                raise UnavailableError(f"model {name!r} has no ready version (versions: {others})")
            raise NotFoundError(
                f"unknown model {name!r}; this server has: "
                + (", ".join(sorted(self._known)) or "no models")
            )
        if not version:
            return self.traffic.pick(name, served)  # type: ignore[no-any-return]
        entry = served.get(int(version))
        if entry is not None:
            return entry
        key = (name, int(version))
        if key in self._loading:
            raise UnavailableError(f"model {name!r} version {version} is still loading")
        if key in self._failures:
            raise UnavailableError(
                f"model {name!r} version {version} failed to load: {self._failures[key].error}"
            )
        raise NotFoundError(
            f"model {name!r} has no version {version}; served versions: "
            + ", ".join(str(v) for v in sorted(served))
        )

    @contextmanager
    def lease(self, name: str, version: str) -> Iterator[ModelVersion]:
        """Resolve a version and hold it for the ``with`` block: it is not unloaded until
        every lease on it is released, even if it is retired meanwhile."""
        entry = self.resolve(name, version)
        entry.active += 1
        try:
            yield entry
        finally:
            entry.active -= 1
            if not entry.active:
                entry._idle.set()
