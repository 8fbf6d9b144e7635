"""OpenTelemetry tracing of calls, configured by the standard ``OTEL_*`` environment
variables, and off — no span made, nothing exported, one ``None`` check per call — unless
an exporter is asked for:

    OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318      # or ..._TRACES_ENDPOINT
    OTEL_TRACES_EXPORTER=otlp | console | none             # otlp when an endpoint is set
    OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.1
    OTEL_SERVICE_NAME=imgclf  OTEL_RESOURCE_ATTRIBUTES=...  OTEL_BSP_*  OTEL_SDK_DISABLED

OTLP goes over HTTP (protobuf), the exporter every collector accepts on port 4318.

What a call leaves (``record_call``), under the caller's context when its ``traceparent``
(W3C trace context, gRPC metadata or HTTP header) names one:

    <method>            the call, SERVER kind: model, version, images, request id, code
      admission         the request's own limits, its bytes and its images admitted
      decode            decoding and resizing its images
      queue             waiting for its batches to be dispatched
      inference         its batches running, linked to each ``batch`` span
      postprocess       top-k, boxes, heatmaps, output tensors

and one ``batch`` span per executed batch (``record_batch``; model, version, batch size),
its own trace, which every request in it links to. The stages are measured anyway for the
statistics extension (``service.server.statistics``), so their spans are made after the
fact from those times: nothing of OpenTelemetry runs on the request path until the call
has ended.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.server.statistics import Stages

log = logging.getLogger(__name__)

TRACER_NAME = "imgclf"
EXPORTERS = ("otlp", "console")


def wanted_exporter(env: Mapping[str, str]) -> str | None:
    """The exporter the environment asks for, or None: tracing off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        if named == "none":
            return None
        if named not in EXPORTERS:
            log.warning(
                "OTEL_TRACES_EXPORTER=%s is not supported (otlp, console): tracing off", named
            )
            return None
        return named
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return "otlp" if endpoint else None


class Tracing:
    """A tracer provider of this process, its exporter, and the spans of calls."""

    def __init__(self, exporter: str):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        if exporter == "otlp":
            protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
            )
            if protocol != "http/protobuf":
                log.warning("OTLP protocol %s is not supported here: using http/protobuf", protocol)
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            span_exporter: Any = OTLPSpanExporter()
        else:
            span_exporter = ConsoleSpanExporter()
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", TRACER_NAME)}
        )
        # The sampler comes from OTEL_TRACES_SAMPLER(_ARG), the batching from OTEL_BSP_*.
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(span_exporter))
        self.tracer = self.provider.get_tracer(TRACER_NAME)
        # time.monotonic() instants (what the stages are measured in) → Unix nanoseconds.
        self._offset_ns = time.time_ns() - time.monotonic_ns()

    def epoch_ns(self, monotonic: float) -> int:
        return int(monotonic * 1e9) + self._offset_ns

    def record_batch(self, model: str, version: str, size: int, start: float, end: float) -> Any:
        """One executed batch's span; its context, for the requests in it to link to."""
        span = self.tracer.start_span(
            "batch",
            attributes={
                "imgclf.model": model,
                "imgclf.version": version,
                "imgclf.batch_size": size,
            },
            start_time=self.epoch_ns(start),
        )
        span.end(end_time=self.epoch_ns(end))
        return span.get_span_context()

    def record_call(
        self,
        method: str,
        carrier: Callable[[], Mapping[str, str]] | None,
        start: float,
        end: float,
        attributes: dict[str, Any],
        ok: bool,
        message: str,
        stages: Stages | None,
    ) -> None:
        """The call's span, under the caller's trace context, and its stages' spans."""
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        parent = propagate.extract(dict(carrier()) if carrier is not None else {})
        call = self.tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=self.epoch_ns(start),
        )
        if not ok:
            call.set_status(Status(StatusCode.ERROR, message))
        if stages is not None and stages.done and call.is_recording():  # sampled out: none
            inside = trace.set_span_in_context(call)
            links = [trace.Link(c) for c in _distinct(stages.batches)]
            for name, begin, finish, span_links in (
                ("admission", stages.started, stages.admitted, None),
                ("decode", stages.admitted, stages.submitted, None),
                ("queue", stages.submitted, stages.dispatched, None),
                ("inference", stages.dispatched, stages.rows_back, links),
                ("postprocess", stages.output_started, stages.output_done, None),
            ):
                if finish <= 0:
                    continue
                child = self.tracer.start_span(
                    name, context=inside, links=span_links, start_time=self.epoch_ns(begin)
                )
                child.end(end_time=self.epoch_ns(finish))
        call.end(end_time=self.epoch_ns(end))

    def shutdown(self) -> None:
        """Export what is buffered (a draining server's last calls) and stop."""
        self.provider.shutdown()


def _distinct(contexts: Sequence[Any]) -> list[Any]:
    seen: dict[int, Any] = {}
    for context in contexts:
        if context is not None:
            seen.setdefault(context.span_id, context)
    return list(seen.values())


_current: Tracing | None = None


def configure(env: Mapping[str, str] | None = None) -> Tracing | None:
    """Tracing for this process as the environment asks (once per process: worker
    processes call it after they start, each with its own exporter thread)."""
    global _current
    if _current is None:
        exporter = wanted_exporter(os.environ if env is None else env)
        if exporter is not None:
            _current = Tracing(exporter)
            log.info("tracing on: OpenTelemetry, %s exporter", exporter)
    return _current


def current() -> Tracing | None:
    """This process's tracing, or None when off (the one check on the request path)."""
    return _current
