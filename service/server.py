"""The server: gRPC (ImageClassifier + health + reflection), /metrics, models, shutdown.

    server, port = await create_server(settings)   # bound, not started
    await server.start()                           # health NOT_SERVING until models are warm
    await server.wait_until_ready()
    await server.stop(grace)                       # NOT_SERVING, drain in-flight, unload

Health entries: "" (the server) and "classifier.v1.ImageClassifier" turn SERVING once a
model version is loaded and warm; "liveness" is SERVING as long as the process runs.

``serve(settings)`` runs that until SIGTERM or SIGINT and returns normally (exit code 0):
health turns NOT_SERVING first (load balancers stop routing), new calls are refused, and
in-flight calls get ``grace_seconds`` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.config import Settings
from service.metrics import Metrics
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.proto_gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from service.repository import ModelRepository
from service.servicer import ImageClassifierServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageClassifier"].full_name
LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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
    ):
        self.settings = settings
        self.grpc_server = grpc_server
        self.port = port
        self.metrics = metrics
        self.repository = repository
        self.health = health_servicer
        self.metrics_port: int | None = None
        self._pools = pools
        self._ready = asyncio.Event()
        self._loader: asyncio.Task[None] | None = None
        self.shutting_down = False

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        await self._set_health(NOT_SERVING)
        # "liveness" answers SERVING while the process runs (a liveness probe must not
        # restart a pod that is merely still loading its models).
        await self.health.set(LIVENESS, SERVING)
        await self.grpc_server.start()
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.settings.host, self.settings.metrics_port)
        log.info(
            "listening",
            extra={
                "grpc_port": self.port,
                "metrics_port": self.metrics_port,
                "repository": str(self.repository.root),
            },
        )
        self._loader = asyncio.get_running_loop().create_task(self._load_models())

    async def _load_models(self) -> None:
        await self.repository.load()
        await self._update_health()
        self.repository.on_change = self._update_health
        self.repository.start_polling()

    async def _update_health(self) -> None:
        """SERVING once at least one model version is loaded and warm; NOT_SERVING else."""
        if self.shutting_down:
            return
        ready = self.repository.ready_versions()
        if ready and not self._ready.is_set():
            await self._set_health(SERVING)
            self._ready.set()
            log.info("serving", extra={"models": [f"{v.name}/{v.version}" for v in ready]})
        elif not ready:
            await self._set_health(NOT_SERVING)
            self._ready.clear()
            log.error("no model is ready in %s; health is NOT_SERVING", self.repository.root)

    async def wait_until_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.grace_seconds if grace is None else grace
        self.shutting_down = True
        await self.health.enter_graceful_shutdown()  # every entry NOT_SERVING, for good
        log.info("shutting down", extra={"grace_seconds": grace})
        await self.grpc_server.stop(grace)  # refuses new calls, lets in-flight ones finish
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        await self.repository.close()
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


async def create_server(settings: Settings) -> tuple[ClassifierServer, int]:
    """Build and bind the server (port 0 picks a free one); ``start()`` it to serve."""
    metrics = Metrics()
    preprocess_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="preprocess")
    inference_pool = ThreadPoolExecutor(
        max(2, settings.instances * 4), thread_name_prefix="inference"
    )
    repository = ModelRepository(settings, metrics, inference_pool)
    grpc_server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
            ("grpc.max_send_message_length", settings.max_send_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    server = ClassifierServer(
        settings,
        grpc_server,
        0,
        metrics,
        repository,
        health.aio.HealthServicer(),
        [preprocess_pool, inference_pool],
    )
    servicer = ImageClassifierServicer(
        settings, repository, metrics, preprocess_pool, lambda: server.shutting_down
    )
    pb_grpc.add_ImageClassifierServicer_to_server(servicer, grpc_server)
    health_pb2_grpc.add_HealthServicer_to_server(server.health, grpc_server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        grpc_server,
    )
    address = f"{settings.host}:{settings.port}"
    try:
        port = grpc_server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot bind gRPC to {address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot bind gRPC to {address} (in use?)")
    server.port = port
    return server, port


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    server, _ = await create_server(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    log.info("stopped")
