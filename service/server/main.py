"""The server: gRPC (classifier.v1, the Open Inference Protocol, health, reflection), the
HTTP port (service.server.http.app), /metrics, models, shutdown.

    server, port = await create_server(settings)   # bound, not started
    await server.start()                           # health NOT_SERVING until models are warm
    await server.wait_until_ready()
    await server.stop()                            # drain, then refuse, then unload

Health entries: "" (the server) and "classifier.v1.ImageClassifier" are SERVING while
every configured model (with none configured: at least one model) has a ready version;
swaps never interrupt that. "liveness" is SERVING as long as the process runs.

``serve(settings)`` runs that until SIGTERM or SIGINT and returns normally (exit code 0).
Shutdown is in two steps, so load balancers learn of it before anything fails: for
``drain_seconds`` health answers NOT_SERVING while calls are still served (readiness
probes and health-checking balancers move traffic away); then the port refuses new calls
and in-flight ones get ``grace_seconds``. A second signal skips the rest of the drain.

The port speaks TLS when ``tls_cert``/``tls_key`` are set (mTLS with ``tls_client_ca``),
re-reading them when they change; with tokens configured every RPC but health needs one.
Connections are closed after ``max_connection_age_seconds`` (clients reconnect and
re-resolve, so replicas added by an autoscaler get traffic from long-lived clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.model.cores import cpu_count
from service.model.memory import FreedMemory, configure_allocator
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.proto_gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from service.server.auth import TokenStore
from service.server.calls import CallEnvelope, CallLog
from service.server.config import Settings
from service.server.dataplane import DataPlane
from service.server.grpc.auth import AuthInterceptor
from service.server.grpc.classifier import ImageClassifierServicer
from service.server.grpc.envelope import GrpcEnvelope
from service.server.grpc.oip import SERVICE_NAME as OIP_SERVICE_NAME
from service.server.grpc.oip import InferenceServicer
from service.server.grpc.oip import add_to_server as add_oip_servicer
from service.server.http.app import create_app
from service.server.http.server import HttpServer
from service.server.metrics import Metrics
from service.server.online import RequestPipeline
from service.server.repository import ModelRepository
from service.server.tls import ServerCertificates
from service.server.tracing import configure as configure_tracing

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageClassifier"].full_name
LIVENESS = "liveness"
# How often memory freed since the last look is given back to the OS (service.model.memory).
MEMORY_TICK_SECONDS = 5.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class WorkerRole:
    """This process is one of ``count`` workers sharing the ports (``service.server.workers``)."""

    index: int
    count: int
    cores: int  # its share of the machine's cores: ONNX Runtime and decode threads
    status_file: Path  # where it tells the supervisor what it serves

    def write_status(self, serving: bool, repository: ModelRepository) -> None:
        status = {
            "index": self.index,
            "pid": os.getpid(),
            "serving": serving,
            "versions": [[e.name, str(e.version)] for e in repository.all_versions()],
            "models": sorted(repository.known_names()),
        }
        temporary = self.status_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(status))
        os.replace(temporary, self.status_file)  # the supervisor never reads half a file


class ClassifierServer:
    """A bound gRPC server plus everything it owns."""

    def __init__(
        self,
        settings: Settings,
        grpc_server: grpc.aio.Server,
        port: int,
        metrics: Metrics,
        repository: ModelRepository,
        health_servicer: health.aio.HealthServicer,
        pools: list[ThreadPoolExecutor],
        freed: FreedMemory | None = None,
        role: WorkerRole | None = None,
    ):
        self.settings = settings
        self.grpc_server = grpc_server
        self.port = port
        self.metrics = metrics
        self.repository = repository
        self.health = health_servicer
        self.metrics_port: int | None = None
        self.http: HttpServer | None = None
        self._pools = pools
        self._freed = freed or FreedMemory()
        self.role = role
        # A worker's own events are not the server's: the supervisor says "serving" once
        # every worker is (tests and tools wait for that).
        self._event = (lambda msg: f"worker {msg}") if role else (lambda msg: msg)
        self._trimmer: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._serving: bool | None = None
        self._loader: asyncio.Task[None] | None = None
        self._skip_drain = asyncio.Event()
        self.shutting_down = False

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        await self._set_health(NOT_SERVING)
        # "liveness" answers SERVING while the process runs (a liveness probe must not
        # restart a pod that is merely still loading its models, or draining).
        await self.health.set(LIVENESS, SERVING)
        await self.grpc_server.start()
        if self.http is not None:
            await self.http.start()
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.settings.host, self.settings.metrics_port)
        log.info(
            self._event("listening"),
            extra={
                "grpc_port": self.port,
                "http_port": self.http.port if self.http else None,
                "metrics_port": self.metrics_port,
                "repository": str(self.repository.root),
                "tls": self.settings.tls_cert is not None,
                "mtls": self.settings.tls_client_ca is not None,
            },
        )
        loop = asyncio.get_running_loop()
        self._loader = loop.create_task(self._load_models())
        self._trimmer = loop.create_task(self._trim_periodically())

    async def _trim_periodically(self) -> None:
        """Give memory freed by a burst back to the OS once things calm down."""
        while True:
            await asyncio.sleep(MEMORY_TICK_SECONDS)
            await asyncio.to_thread(self._freed.release_if_due, True)

    async def _load_models(self) -> None:
        await self.repository.load()
        await self._update_health()
        self.repository.on_change = self._update_health
        self.repository.start_polling()

    async def _update_health(self) -> None:
        """SERVING while the repository serves what it must (see ``serving()``)."""
        if self.shutting_down:
            return
        serving = self.repository.serving()
        if self.role is not None:
            self.role.write_status(serving, self.repository)
        if serving == self._serving:
            return  # Watch streams are told of changes only
        self._serving = serving
        await self._set_health(SERVING if serving else NOT_SERVING)
        if serving:
            self._ready.set()
            ready = self.repository.ready_versions()
            log.info(
                self._event("serving"),
                extra={"models": [f"{v.name}/{v.version}" for v in ready]},
            )
        else:
            self._ready.clear()
            log.error("not every model has a ready version; health is NOT_SERVING")

    def is_ready(self) -> bool:
        """What health answers: ready to serve, and not draining."""
        return bool(self._serving) and not self.shutting_down

    async def wait_until_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    def skip_drain(self) -> None:
        self._skip_drain.set()

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Drain (NOT_SERVING, still answering), then refuse new calls, then unload."""
        grace = self.settings.grace_seconds if grace is None else grace
        drain = self.settings.drain_seconds if drain is None else drain
        self.shutting_down = True
        for task in (self._loader, self._trimmer):
            if task is not None and not task.done():
                task.cancel()
        await self._set_health(NOT_SERVING)
        log.info("draining", extra={"drain_seconds": drain, "grace_seconds": grace})
        if drain > 0:
            with contextlib.suppress(TimeoutError):  # the drain ran its full length
                await asyncio.wait_for(self._skip_drain.wait(), drain)
        await self.health.enter_graceful_shutdown()  # every entry NOT_SERVING, for good
        log.info("shutting down", extra={"grace_seconds": grace})
        # Both ports refuse new calls and let in-flight ones finish, at the same time.
        stopping = [self.grpc_server.stop(grace)]
        if self.http is not None:
            stopping.append(self.http.stop())
        await asyncio.gather(*stopping)
        await self.repository.close()
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def server_options(settings: Settings, reuse_port: bool = False) -> list[tuple[str, int]]:
    """gRPC channel arguments from the settings: message sizes, keepalive, connection age.

    SO_REUSEPORT only for workers, which share the port on purpose; a lone server must
    fail to start when its port is taken, not share it with a stranger.
    """
    s = settings
    options = [
        ("grpc.max_receive_message_length", s.max_receive_message_bytes),
        ("grpc.max_send_message_length", s.max_send_message_bytes),
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.keepalive_time_ms", int(s.keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        (
            "grpc.http2.min_recv_ping_interval_without_data_ms",
            int(s.min_client_ping_interval_seconds * 1000),
        ),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if s.max_connection_age_seconds > 0:
        options += [
            ("grpc.max_connection_age_ms", int(s.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace_seconds * 1000)),
        ]
    if s.max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", s.max_concurrent_streams))
    return options


async def create_server(
    settings: Settings, role: WorkerRole | None = None
) -> tuple[ClassifierServer, int]:
    """Build and bind the server (port 0 picks a free one); ``start()`` it to serve."""
    metrics = Metrics()
    cores = role.cores if role else cpu_count()
    decode_threads = settings.preprocess_threads or 2 * cores
    preprocess_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="preprocess")
    inference_pool = ThreadPoolExecutor(
        max(2, settings.instances * 4), thread_name_prefix="inference"
    )
    runner_options = replace(settings.runner_options(), cores=cores)
    repository = ModelRepository(settings, metrics, inference_pool, runner_options)
    pipeline = RequestPipeline(settings, metrics, preprocess_pool)
    tokens = TokenStore(
        settings.auth_token.get_secret_value() if settings.auth_token else None,
        settings.auth_token_file,
    )
    calls = CallLog(settings, metrics, repository.is_served)
    envelope = CallEnvelope(calls, tokens)
    grpc_envelope = GrpcEnvelope(envelope)
    interceptors = (
        [AuthInterceptor(envelope.authorized, grpc_envelope.refuse_unauthenticated)]
        if tokens.enabled
        else []
    )
    grpc_server = grpc.aio.server(
        interceptors=interceptors, options=server_options(settings, reuse_port=role is not None)
    )
    server = ClassifierServer(
        settings,
        grpc_server,
        0,
        metrics,
        repository,
        health.aio.HealthServicer(),
        [preprocess_pool, inference_pool],
        pipeline.freed,
        role,
    )
    plane = DataPlane(settings, repository, pipeline, server.is_ready, calls.label_for)
    pb_grpc.add_ImageClassifierServicer_to_server(
        ImageClassifierServicer(plane, grpc_envelope), grpc_server
    )
    add_oip_servicer(InferenceServicer(plane, grpc_envelope), grpc_server)
    health_pb2_grpc.add_HealthServicer_to_server(server.health, grpc_server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            OIP_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        grpc_server,
    )
    address = f"{settings.host}:{settings.port}"
    try:
        if settings.tls_cert is not None and settings.tls_key is not None:
            certificates = ServerCertificates(
                settings.tls_cert, settings.tls_key, settings.tls_client_ca
            )
            port = grpc_server.add_secure_port(address, certificates.credentials())
        else:
            port = grpc_server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot bind gRPC to {address}: {exc}") from None
    except ValueError as exc:  # unusable TLS files
        raise OSError(str(exc)) from None
    if port == 0:
        raise OSError(f"cannot bind gRPC to {address} (in use?)")
    server.port = port
    if settings.http_port is not None:
        app = create_app(settings, plane, envelope)
        try:
            server.http = HttpServer(settings, app, reuse_port=role is not None)
        except ValueError as exc:  # unusable TLS files
            raise OSError(str(exc)) from None
    return server, port


async def serve(settings: Settings, role: WorkerRole | None = None) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    configure_allocator()  # before the first large decode: see service.model.memory
    tracing = configure_tracing()  # in this process: each worker exports its own spans
    server, _ = await create_server(settings, role)
    await server.start()
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            server.skip_drain()  # a second signal: no more waiting for load balancers
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    await server.stop()
    if tracing is not None:
        await asyncio.to_thread(tracing.shutdown)  # the last calls' spans are exported
    log.info("stopped")
