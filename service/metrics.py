"""Every Prometheus metric of the server, defined once (prefix ``classifier_``).

Each server owns a ``Metrics`` with its own registry, so several servers can live in one
process (the tests do this) and ``/metrics`` shows exactly one server's numbers.
"""

from __future__ import annotations

from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Latency buckets from 0.5 ms to 10 s: batch-1 CPU inference sits at a few ms, a queue
# under overload at seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "classifier_requests",
            "RPCs by outcome (gRPC status code name)",
            ["model", "version", "method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "classifier_request_duration_seconds",
            "RPC latency, end to end in the server",
            ["model", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "classifier_images", "images answered", ["model", "version"], registry=r
        )
        self.preprocess_duration = Histogram(
            "classifier_preprocess_duration_seconds",
            "decode + resize time per image",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "classifier_queue_duration_seconds",
            "time an image waits for its batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "classifier_inference_duration_seconds",
            "ONNX Runtime time per batch",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "classifier_batch_size",
            "images per executed batch",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.pending_images = Gauge(
            "classifier_pending_images",
            "images queued for a batch",
            ["model", "version"],
            registry=r,
        )
        self.dropped_images = Counter(
            "classifier_dropped_images",
            "images dropped before compute",
            ["model", "version", "reason"],
            registry=r,
        )
        self.model_ready = Gauge(
            "classifier_model_ready",
            "1 when the model version serves requests",
            ["model", "version"],
            registry=r,
        )
        self.model_load_duration = Histogram(
            "classifier_model_load_duration_seconds",
            "load + warm-up time per model version",
            ["model"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.model_load_failures = Counter(
            "classifier_model_load_failures",
            "model versions that failed to load",
            ["model"],
            registry=r,
        )
        self._http: WSGIServer | None = None
        self._children: dict[tuple[object, ...], Any] = {}

    def child(self, metric: Any, *label_values: str) -> Any:
        """``metric.labels(*label_values)``, cached: label lookup is a measurable part of
        a small request's cost, and the label sets are few."""
        key = (id(metric), *label_values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*label_values)
        return found

    def serve(self, host: str, port: int) -> int:
        """Start /metrics on its own HTTP port (a daemon thread); returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
