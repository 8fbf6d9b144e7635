"""The Open Inference Protocol's statistics extension (Triton's fields), per model version:
recorded into Prometheus counters as calls end, and read back from them.

Reading the counters, rather than keeping a second tally, is what makes the statistics
endpoint and ``/metrics`` agree over any window, and add up across worker processes: with
workers, every process's counters live in prometheus_client's multiprocess directory, and
whichever worker answers a statistics call reads them all.

What each statistic means here (Triton's names; durations are wall time):

* ``success`` / ``fail``: inference requests (one call, however many images) that were
  answered or failed once their model version was known, and their whole time in the
  server, from the call's start to its answer.
* ``compute_input``: admission and decoding the request's images into input tensors.
* ``queue``: from the request's images entering the batcher until the last of their
  batches was dispatched.
* ``compute_infer``: from that dispatch until the last of the request's rows came back.
* ``compute_output``: postprocessing (top-k, boxes, heatmaps, output tensors).
* ``inference_count``: images answered; ``execution_count``: batches run.
* ``batch_stats``: per batch size, the batches run and their time (``BatchTiming``).

The four stages of a request follow each other, so they add up to its ``success`` time
less what the front door spends reading the request and writing the answer.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from service.server.metrics import Metrics

REQUEST_STATS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
BATCH_STATS = ("compute_input", "compute_infer", "compute_output")
NS = 1_000_000_000


@dataclass
class Stages:
    """When one inference request passed each point (``time.monotonic()``; 0: not
    reached), as the online pipeline and the data plane record them, and the trace
    contexts of the batches its images ran in (``service.server.tracing``)."""

    started: float = 0.0  # the pipeline took the request
    admitted: float = 0.0  # its limits checked, its bytes and images admitted
    submitted: float = 0.0  # its images decoded and in the batcher's queue
    dispatched: float = 0.0  # the last of its batches dispatched
    rows_back: float = 0.0  # every output row back
    output_started: float = 0.0
    output_done: float = 0.0
    batches: list[Any] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.output_done > 0

    @property
    def compute_input(self) -> float:
        return self.submitted - self.started

    @property
    def queue(self) -> float:
        return self.dispatched - self.submitted

    @property
    def compute_infer(self) -> float:
        return self.rows_back - self.dispatched

    @property
    def compute_output(self) -> float:
        return self.output_done - self.output_started


@dataclass(frozen=True)
class Duration:
    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class BatchStatistics:
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True)
class ModelStatistics:
    name: str
    version: str
    last_inference: int  # milliseconds since the epoch; 0: never
    inference_count: int
    execution_count: int
    inference_stats: dict[str, Duration]  # REQUEST_STATS → Duration
    batch_stats: list[BatchStatistics] = field(default_factory=list)


def record_request(
    metrics: Metrics, model: str, version: str, stages: Stages, ok: bool, seconds: float
) -> None:
    """Count one finished inference request of ``model``/``version``."""
    m = metrics

    def add(stat: str, duration: float) -> None:
        m.child(m.request_stats, model, version, stat).inc()
        m.child(m.request_stats_seconds, model, version, stat).inc(max(0.0, duration))

    if not ok or not stages.done:
        add("fail", seconds)
        return
    add("success", seconds)
    add("compute_input", stages.compute_input)
    add("queue", stages.queue)
    add("compute_infer", stages.compute_infer)
    add("compute_output", stages.compute_output)
    m.child(m.last_inference, model, version).set(time.time())


class _Tally:
    """Counter samples of one model version, as read from the families."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = defaultdict(float)
        self.seconds: dict[str, float] = defaultdict(float)
        self.images = 0.0
        self.last = 0.0
        self.batches: dict[int, float] = defaultdict(float)
        self.batch_seconds: dict[tuple[int, str], float] = defaultdict(float)

    def add(self, sample: Any) -> None:
        labels, value = sample.labels, sample.value
        name = sample.name
        if name == "classifier_request_stats_total":
            self.counts[labels["stat"]] += value
        elif name == "classifier_request_stats_seconds_total":
            self.seconds[labels["stat"]] += value
        elif name == "classifier_images_total":
            self.images += value
        elif name == "classifier_last_inference_timestamp_seconds":
            self.last = max(self.last, value)
        elif name == "classifier_batch_executions_total":
            self.batches[int(labels["batch_size"])] += value
        elif name == "classifier_batch_stats_seconds_total":
            self.batch_seconds[(int(labels["batch_size"]), labels["stat"])] += value

    def statistics(self, name: str, version: str) -> ModelStatistics:
        def ns(seconds: float) -> int:
            return round(seconds * NS)

        batch_stats = [
            BatchStatistics(
                size,
                *(Duration(int(count), ns(self.batch_seconds[(size, s)])) for s in BATCH_STATS),
            )
            for size, count in sorted(self.batches.items())
        ]
        return ModelStatistics(
            name=name,
            version=version,
            last_inference=round(self.last * 1000),
            inference_count=int(self.images),
            execution_count=int(sum(self.batches.values())),
            inference_stats={
                s: Duration(int(self.counts[s]), ns(self.seconds[s])) for s in REQUEST_STATS
            },
            batch_stats=batch_stats,
        )


def read_statistics(
    families: Iterable[Any], versions: list[tuple[str, str]]
) -> list[ModelStatistics]:
    """The statistics of each (model, version) in ``versions``, in that order (zeros for
    a version that has answered nothing yet)."""
    tallies = {key: _Tally() for key in versions}
    for family in families:
        for sample in family.samples:
            key = (sample.labels.get("model", ""), sample.labels.get("version", ""))
            tally = tallies.get(key)
            if tally is not None:
                tally.add(sample)
    return [tallies[key].statistics(*key) for key in versions]
