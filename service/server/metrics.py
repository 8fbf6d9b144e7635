"""Every Prometheus metric of the server, defined once (prefix ``classifier_``).

Each server owns a ``Metrics`` with its own registry, so several servers can live in one
process (the tests do this) and ``/metrics`` shows exactly one server's numbers.

Label values are bounded: only the names and versions of served models ever become
``model``/``version`` values (a request naming anything else is counted under
``model="_unknown"``), and ``forget_version``/``forget_model`` remove the series of what
is unloaded. A client can therefore never grow the number of series.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Latency buckets from 0.5 ms to 10 s: batch-1 CPU inference sits at a few ms, a queue
# under overload at seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The model label of calls that name no served model (unknown names, failed auth).
UNKNOWN_MODEL = "_unknown"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._define_call_metrics(self.registry)
        self._define_batch_metrics(self.registry)
        self._define_model_metrics(self.registry)
        # Metrics labelled (model, version, ...), in that order.
        self._by_version = {
            self.requests,
            self.images,
            self.inference_duration,
            self.batch_size,
            self.pending_images,
            self.dropped_images,
            self.model_ready,
        }
        self._http: WSGIServer | None = None
        # (metric, label values) → child. Every labelled series goes through ``child``,
        # so this is also the list of series that forget_* removes.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def _define_call_metrics(self, r: CollectorRegistry) -> None:
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

    def _define_batch_metrics(self, r: CollectorRegistry) -> None:
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
        # With worker processes (prometheus_client's multiprocess mode) a gauge says how
        # its workers' values combine: pending images add up; a version is ready if a
        # live worker serves it.
        self.pending_images = Gauge(
            "classifier_pending_images",
            "images admitted and not yet batched (decoding or queued)",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.dropped_images = Counter(
            "classifier_dropped_images",
            "images dropped before compute",
            ["model", "version", "reason"],
            registry=r,
        )

    def _define_model_metrics(self, r: CollectorRegistry) -> None:
        self.model_ready = Gauge(
            "classifier_model_ready",
            "1 when the model version serves requests",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
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

    def child(self, metric: Any, *label_values: str) -> Any:
        """``metric.labels(*label_values)``, cached: label lookup is a measurable part of
        a small request's cost, and the label sets are few. Label values are positional,
        in the order the metric declares them (``model`` first, then ``version``)."""
        key = (metric, label_values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*label_values)
        return found

    def model_known(self, model: str) -> None:
        """Create a model's load-failure series at 0, so ``increase()`` sees its first."""
        self.child(self.model_load_failures, model)

    def forget_version(self, model: str, version: str) -> None:
        """Remove every series of one model version (it was unloaded)."""
        self._forget(
            lambda metric, labels: (
                metric in self._by_version and labels[0] == model and labels[1] == version
            )
        )

    def forget_model(self, model: str) -> None:
        """Remove every series of a model that has left the repository."""
        self._forget(lambda metric, labels: labels[0] == model)

    def _forget(self, matches: Callable[[Any, tuple[str, ...]], bool]) -> None:
        for key in list(self._children):
            metric, labels = key
            if matches(metric, labels):
                del self._children[key]
                with contextlib.suppress(KeyError):  # never observed, so never created
                    metric.remove(*labels)

    def series_count(self) -> int:
        return sum(len(family.samples) for family in self.registry.collect())

    def serve(self, host: str, port: int) -> int:
        """Start /metrics on its own HTTP port (a daemon thread); returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
