"""Worker processes on one port: fork, supervise, drain.

    python -m service --workers 2        # 0 (the default): one per core on CPU

One Python process keeps at most about 1.5 cores busy: its event loop, gRPC's threads and
the GIL hand-offs between decoding and inference queue behind each other. So the server
runs N whole servers — each with its own event loop, batcher, ONNX Runtime session, and
threads sized for its share of the cores — on the same ports, and the kernel spreads
*connections* over them (SO_REUSEPORT). Clients spread their calls over a few channels
(the SDK's ``channels``), so one client reaches every worker.

This parent process, as grpc's ``examples/python/multiprocessing`` does:

1. reserves the ports (binds them with SO_REUSEPORT and keeps them, so port 0 resolves
   once and no stranger takes them), and prepares prometheus_client's multiprocess
   directory — before any gRPC or Prometheus object exists (``workers_dir``: locked for
   its life, so the next supervisor sweeps it away if this one is killed);
2. forks the workers; each runs ``service.server.main.serve`` on the reserved ports;
3. serves /metrics itself, adding up every worker's files (``MultiProcessCollector``)
   and showing only the model versions some live worker serves;
4. supervises: a worker that dies is logged, counted and restarted after a backoff
   (1 s, doubling to 30 s); if workers keep dying (``MAX_CRASHES`` within
   ``CRASH_WINDOW_SECONDS``) it stops them all and exits 1;
5. ties each worker's life to its own: a worker gets SIGTERM when the supervisor dies,
   even by SIGKILL (``PR_SET_PDEATHSIG``), so no orphan keeps the port;
6. on SIGTERM/SIGINT forwards SIGTERM to every worker — each drains as a lone server
   does (NOT_SERVING while still serving, then refuse, then grace) — and exits 0 once all
   have exited 0. A second signal is forwarded too (the workers skip the rest of their
   drain).

The server-wide memory bounds (``max_decode_pixels``, ``max_inflight_bytes``) are split
evenly between the workers, so N workers hold no more decoded pixels or image bytes than
one server would.

Health is per worker and truthful: whichever worker a probe reaches answers for itself,
and each reloads the repository on its own, by the same rules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from service.model.cores import cpu_count
from service.server.config import Settings
from service.server.worker_metrics import MULTIPROC_ENV, ServedOnly
from service.server.workers_dir import WorkersDirectory

log = logging.getLogger(__name__)

MAX_CRASHES = 5
CRASH_WINDOW_SECONDS = 60.0
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
TICK_SECONDS = 0.2
# The supervisor's own series (``_total`` on the wire), beside the workers' metrics.
RESTARTS_METRIC = "classifier_worker_restarts"


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) with SO_REUSEPORT: the port is ours, workers share it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot reserve {host}:{port}: {exc.strerror}") from None
    return sock


@dataclass
class Worker:
    index: int
    process: BaseProcess | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # when a dead worker is due to be started again
    backoff: float = FIRST_BACKOFF_SECONDS
    exit_codes: list[int] = field(default_factory=list)


def _worker_main(settings: Settings, index: int, count: int, cores: int, status: str) -> None:
    """A forked worker: the whole server on the reserved ports."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)  # the server installs its own in its loop
    from service.server import eventloop, logs
    from service.server.main import WorkerRole, serve

    logs.set_worker(index)
    role = WorkerRole(index=index, count=count, cores=cores, status_file=Path(status))
    eventloop.run(serve(settings, role))


WorkerMain = Any  # (settings, index, count, cores, status file) -> None, in the child

_PR_SET_PDEATHSIG = 1


def tie_to_parent(parent_pid: int) -> bool:
    """Ask the kernel for SIGTERM when our parent dies, even by SIGKILL (Linux; elsewhere
    nothing). False if the parent is already gone: the caller should exit at once.

    The kernel means the parent *thread*: start such children from a thread that lives
    as long as the parent process (its main thread)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == parent_pid  # else it died before the request took effect


def _run_worker(worker_main: WorkerMain, supervisor_pid: int, *args: Any) -> None:
    """The child's entry: tied to the supervisor's life, then the worker's body.

    A supervisor killed with SIGKILL cannot forward anything, and an orphaned worker would
    keep the port and answer with no one supervising it. So each worker gets SIGTERM when
    the supervisor dies (it then drains like any stopped worker).
    """
    if not tie_to_parent(supervisor_pid):
        os._exit(0)
    worker_main(*args)


class Supervisor:
    def __init__(self, settings: Settings, count: int, worker_main: WorkerMain = None):
        self.settings = settings
        self.count = count
        # The child's body; tests give a stand-in to exercise the supervision itself.
        self.worker_main = worker_main or _worker_main
        self.cores = max(1, cpu_count() // count)
        self.workers = [Worker(i) for i in range(count)]
        self.crashes: list[float] = []
        self.stopping = False
        self.signals = 0
        self.restarts = 0
        self._announced = False
        self.stop_deadline = 0.0

    # --- setting up ------------------------------------------------------------------

    def prepare(self) -> Settings:
        """Reserve the ports and the metrics directory; the workers' settings."""
        s = self.settings
        self.sockets = [reserve_port(s.host, s.port)]
        grpc_port = self.sockets[0].getsockname()[1]
        http_port = None
        if s.http_port is not None:
            self.sockets.append(reserve_port(s.host, s.http_port))
            http_port = self.sockets[1].getsockname()[1]
        self.workdir = WorkersDirectory.create()
        self.directory = self.workdir.path
        self._previous_env = os.environ.get(MULTIPROC_ENV)
        os.environ[MULTIPROC_ENV] = str(self.directory)  # before prometheus_client loads
        worker_settings = s.model_copy(
            update={
                "port": grpc_port,
                "http_port": http_port,
                "metrics_port": None,
                # The memory bounds are the server's, so each worker gets its share. Not
                # below what one image or one request needs, or those could never pass.
                "max_decode_pixels": max(s.max_decode_pixels // self.count, s.max_image_pixels),
                "max_inflight_bytes": max(s.max_inflight_bytes // self.count, s.max_image_bytes),
            }
        )
        self.grpc_port, self.http_port = grpc_port, http_port
        return worker_settings

    def status_file(self, index: int) -> Path:
        return self.directory / f"status-{index}.json"

    def start(self, worker: Worker, settings: Settings) -> None:
        self.status_file(worker.index).unlink(missing_ok=True)
        status = str(self.status_file(worker.index))
        context = multiprocessing.get_context("fork")
        process = context.Process(
            target=_run_worker,
            args=(
                self.worker_main,
                os.getpid(),
                settings,
                worker.index,
                self.count,
                self.cores,
                status,
            ),
            name=f"imgclf-worker-{worker.index}",
        )
        process.start()
        worker.process, worker.started_at, worker.restart_at = process, time.monotonic(), None
        log.info("worker %d started (pid %d)", worker.index, process.pid)

    # --- what the workers report -----------------------------------------------------

    def statuses(self) -> list[dict[str, Any]]:
        out = []
        for worker in self.workers:
            if worker.process is None or not worker.process.is_alive():
                continue
            try:
                status = json.loads(self.status_file(worker.index).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if status.get("pid") == worker.process.pid:
                out.append(status)
        return out

    def served(self) -> tuple[set[tuple[str, str]], set[str]]:
        """(model, version) pairs and model names that some live worker knows."""
        versions: set[tuple[str, str]] = set()
        models: set[str] = set()
        for status in self.statuses():
            versions |= {(str(m), str(v)) for m, v in status["versions"]}
            models |= set(status["models"])
        return versions, models

    # --- the loop --------------------------------------------------------------------

    def run(self) -> int:
        worker_settings = self.prepare()
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for worker in self.workers:
                self.start(worker, worker_settings)
            metrics_port = self._serve_metrics()
            log.info(
                "listening",
                extra={
                    "grpc_port": self.grpc_port,
                    "http_port": self.http_port,
                    "metrics_port": metrics_port,
                    "workers": self.count,
                    "cores_per_worker": self.cores,
                },
            )
            return self._supervise(worker_settings)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for sock in self.sockets:
                sock.close()
            self.workdir.remove()
            if self._previous_env is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = self._previous_env

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.stopping:
            self.stop_deadline = (
                time.monotonic() + self.settings.drain_seconds + self.settings.grace_seconds + 10
            )
        self.stopping = True
        self.signals += 1
        for worker in self.workers:  # every worker drains (a second signal: skip it)
            if worker.process is not None and worker.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(worker.process.pid or 0), signal.SIGTERM)

    def _supervise(self, worker_settings: Settings) -> int:
        while True:
            time.sleep(TICK_SECONDS)
            alive = [w for w in self.workers if w.process is not None and w.process.is_alive()]
            if self.stopping:
                if not alive:
                    return self._final_code()
                if time.monotonic() > self.stop_deadline:  # a worker that will not stop
                    for worker in alive:
                        log.error("worker %d did not stop in time; killing it", worker.index)
                        worker.process.kill()  # type: ignore[union-attr]
                continue
            for worker in self.workers:
                self._check(worker, worker_settings)
            if len(self.crashes) >= MAX_CRASHES:
                log.error(
                    "workers crashed %d times within %.0f s; stopping",
                    len(self.crashes),
                    CRASH_WINDOW_SECONDS,
                )
                self._on_signal(signal.SIGTERM, None)
                self._wait_all()
                return 1
            if not self._announced and self._all_serving():
                self._announced = True
                log.info("serving", extra={"workers": self.count})

    def _check(self, worker: Worker, settings: Settings) -> None:
        process = worker.process
        now = time.monotonic()
        if process is not None and not process.is_alive():
            code = process.exitcode if process.exitcode is not None else -1
            worker.exit_codes.append(code)
            self._forget(process)
            worker.process = None
            self.crashes = [t for t in self.crashes if now - t < CRASH_WINDOW_SECONDS] + [now]
            if now - worker.started_at > CRASH_WINDOW_SECONDS:
                worker.backoff = FIRST_BACKOFF_SECONDS  # it had been running fine
            worker.restart_at = now + worker.backoff
            log.error(
                "worker %d (pid %s) exited with %s; restarting in %.1f s",
                worker.index,
                process.pid,
                code,
                worker.backoff,
                extra={"worker_restarts": self.restarts + 1},
            )
            worker.backoff = min(MAX_BACKOFF_SECONDS, worker.backoff * 2)
        if worker.process is None and worker.restart_at is not None and now >= worker.restart_at:
            self.restarts += 1
            self._restarts_metric()
            self.start(worker, settings)

    def _forget(self, process: BaseProcess) -> None:
        """A dead worker's live gauges leave the metrics (its counters stay counted)."""
        from prometheus_client import multiprocess

        if process.pid is not None:
            multiprocess.mark_process_dead(process.pid, str(self.directory))

    def _all_serving(self) -> bool:
        statuses = self.statuses()
        return len(statuses) == self.count and all(s["serving"] for s in statuses)

    def _wait_all(self, timeout: float | None = None) -> None:
        limit = timeout or self.settings.drain_seconds + self.settings.grace_seconds + 10
        deadline = time.monotonic() + limit
        for worker in self.workers:
            if worker.process is not None:
                worker.process.join(max(0.0, deadline - time.monotonic()))
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join(5)

    def _final_code(self) -> int:
        codes = [w.process.exitcode for w in self.workers if w.process is not None]
        failed = [c for c in codes if c not in (0, None)]
        log.info("stopped", extra={"worker_exit_codes": codes})
        return 1 if failed else 0

    # --- metrics -----------------------------------------------------------------------

    def _serve_metrics(self) -> int | None:
        if self.settings.metrics_port is None:
            return None
        from prometheus_client import CollectorRegistry, Counter, start_http_server

        # In multiprocess mode this counter lives in the shared directory too, so the
        # collector below reports it with the workers' metrics.
        self._restarts = Counter(
            RESTARTS_METRIC,
            "worker processes restarted after dying",
            registry=CollectorRegistry(),
        )
        self._restarts.inc(0)
        registry = CollectorRegistry()
        registry.register(ServedOnly(self.directory, self.served))
        server, _ = start_http_server(
            self.settings.metrics_port, addr=self.settings.host, registry=registry
        )
        return int(server.server_port)

    def _restarts_metric(self) -> None:
        counter = getattr(self, "_restarts", None)
        if counter is not None:
            counter.inc()


def supervise(settings: Settings) -> int:
    count = settings.worker_count()
    return Supervisor(settings, count).run()
