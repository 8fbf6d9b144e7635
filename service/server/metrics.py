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
import os
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from service.server.worker_metrics import MULTIPROC_ENV

# Latency buckets from 0.5 ms to 10 s: batch-1 CPU inference sits at a few ms, a queue
# under overload at seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Top-1 scores: fine near 1, where a confident model's answers sit and a drift shows first.
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# The model label of calls that name no served model (unknown names, failed auth).
UNKNOWN_MODEL = "_unknown"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._define_call_metrics(self.registry)
        self._define_batch_metrics(self.registry)
        self._define_model_metrics(self.registry)
        self._define_statistics_metrics(self.registry)
        self._define_prediction_metrics(self.registry)
        # Metrics labelled (model, version, ...), in that order.
        self._by_version = {
            self.requests,
            self.images,
            self.inference_duration,
            self.batch_size,
            self.pending_images,
            self.dropped_images,
            self.model_ready,
            self.request_stats,
            self.request_stats_seconds,
            self.batch_executions,
            self.batch_stats_seconds,
            self.last_inference,
            self.predictions,
            self.top1_score,
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

    def _define_statistics_metrics(self, r: CollectorRegistry) -> None:
        # What the Open Inference Protocol's statistics extension reports (Triton's
        # fields), kept as counters so that worker processes add up and /metrics and the
        # statistics endpoint can never disagree (service.server.statistics reads these).
        self.request_stats = Counter(
            "classifier_request_stats",
            "inference requests by statistic (success, fail, queue, compute_input, "
            "compute_infer, compute_output)",
            ["model", "version", "stat"],
            registry=r,
        )
        self.request_stats_seconds = Counter(
            "classifier_request_stats_seconds",
            "time of inference requests by statistic",
            ["model", "version", "stat"],
            registry=r,
        )
        self.batch_executions = Counter(
            "classifier_batch_executions",
            "batches executed, by batch size",
            ["model", "version", "batch_size"],
            registry=r,
        )
        self.batch_stats_seconds = Counter(
            "classifier_batch_stats_seconds",
            "time of executed batches by batch size and statistic (compute_input, "
            "compute_infer, compute_output)",
            ["model", "version", "batch_size", "stat"],
            registry=r,
        )
        self.last_inference = Gauge(
            "classifier_last_inference_timestamp_seconds",
            "when the version last answered an inference request (Unix time)",
            ["model", "version"],
            registry=r,
            multiprocess_mode="max",
        )

    def _define_prediction_metrics(self, r: CollectorRegistry) -> None:
        # What the model answers, for drift: the mix of top-1 classes (labels bounded by
        # prediction_classes_max, the rest "other") and the top-1 score.
        self.predictions = Counter(
            "classifier_predictions",
            "images answered, by top-1 class",
            ["model", "version", "class"],
            registry=r,
        )
        self.top1_score = Histogram(
            "classifier_top1_score",
            "top-1 probability of answered images",
            ["model", "version"],
            buckets=SCORE_BUCKETS,
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

    def families(self) -> Iterable[Any]:
        """Every metric family of the server: all worker processes' values added up when
        the server runs workers (the multiprocess directory), else this registry's."""
        directory = os.environ.get(MULTIPROC_ENV)
        if directory:
            from prometheus_client.multiprocess import MultiProcessCollector

            families: Iterable[Any] = MultiProcessCollector(None, path=directory).collect()
            return families
        return self.registry.collect()

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
