"""OpenTelemetry tracing end to end: a real server exporting OTLP/HTTP to a real receiver
started here (an HTTP server that decodes the exported protobuf, as a collector would),
and callers with their own trace — the SDK inside a span, a plain HTTP call with a
``traceparent`` header, the gRPC scoring engine — whose trace the server's spans join."""

from __future__ import annotations

import gzip
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import TracerProvider

from service.scoring.grpc_engine import GrpcEngine
from tests.integration.service.conftest import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = {"admission", "decode", "queue", "inference", "postprocess"}
SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER


class Receiver:
    """An OTLP/HTTP trace receiver on a free port: every span it is sent, with its
    resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Any]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                with owner.lock:
                    for resource_spans in request.resource_spans:
                        resource = attributes(resource_spans.resource.attributes)
                        for scope in resource_spans.scope_spans:
                            owner.spans.extend((resource, span) for span in scope.spans)
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}/v1/traces"

    def trace(self, trace_id: bytes, names: set[str], timeout: float = 20) -> list[Any]:
        """The spans of one trace, once spans of every name in ``names`` have arrived."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [s for _, s in self.spans if s.trace_id == trace_id]
            if names <= {s.name for s in found}:
                return found
            assert time.monotonic() < deadline, sorted(s.name for s in found)
            time.sleep(0.05)

    def by_span_id(self, span_id: bytes) -> Any:
        with self.lock:
            return next((s for _, s in self.spans if s.span_id == span_id), None)


def attributes(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        which = item.value.WhichOneof("value")
        out[item.key] = getattr(item.value, which) if which else None
    return out


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.server.shutdown()


@pytest.fixture(scope="module")
def traced_server(quick_model: dict[str, Path], receiver: Receiver) -> Iterator[ServerProcess]:
    server = ServerProcess(
        quick_model["repository"],
        env={
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
            "OTEL_SERVICE_NAME": "imgclf-under-test",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        },
    )
    try:
        server.wait_for_event("serving")
        yield server
    finally:
        server.kill()


def photos(quick_model: dict[str, Path], count: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted((quick_model["data"] / "val").rglob("*.jpg"))[:count]]


def check_call_trace(receiver: Receiver, caller: Any, method: str, images: int) -> Any:
    """The server's call span is a child of the caller's span, in its trace, and has one
    child per stage; the inference stage links to the batch spans. Returns the call span."""
    trace_id = caller.trace_id.to_bytes(16, "big")
    spans = receiver.trace(trace_id, {method, *STAGES})
    (call,) = [s for s in spans if s.name == method]
    assert call.parent_span_id == caller.span_id.to_bytes(8, "big")
    assert call.kind == SERVER_KIND
    found = attributes(call.attributes)
    assert found["imgclf.model"] == "demo" and found["imgclf.version"] == "1"
    assert found["imgclf.images"] == images and found["imgclf.request_id"]
    assert found["imgclf.code"] == "OK"
    children = {s.name: s for s in spans if s.parent_span_id == call.span_id}
    assert set(children) == STAGES
    for child in children.values():
        assert call.start_time_unix_nano <= child.start_time_unix_nano
        assert child.start_time_unix_nano <= child.end_time_unix_nano <= call.end_time_unix_nano
    links = children["inference"].links
    assert links, "the inference stage links to its batches"
    for link in links:
        deadline = time.monotonic() + 10
        while (batch := receiver.by_span_id(link.span_id)) is None:
            assert time.monotonic() < deadline, "the linked batch span was not exported"
            time.sleep(0.05)
        assert batch.name == "batch" and batch.trace_id == link.trace_id
        batch_attributes = attributes(batch.attributes)
        assert batch_attributes["imgclf.batch_size"] >= 1
        assert batch_attributes["imgclf.model"] == "demo"
    return call


def test_a_classify_call_from_the_sdk_joins_the_callers_trace(
    traced_server: ServerProcess, receiver: Receiver, quick_model: dict[str, Path]
) -> None:
    tracer = TracerProvider().get_tracer("test-caller")
    with traced_server.client() as client, tracer.start_as_current_span("caller") as span:
        client.classify(photos(quick_model, 2), model="demo")
    caller = span.get_span_context()
    check_call_trace(receiver, caller, "Classify", images=2)
    with receiver.lock:
        resources = [r for r, s in receiver.spans if s.name == "Classify"]
    assert resources[0]["service.name"] == "imgclf-under-test"


def test_an_http_call_with_a_traceparent_header_joins_that_trace(
    traced_server: ServerProcess, receiver: Receiver, quick_model: dict[str, Path]
) -> None:
    trace_id, span_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    request = urllib.request.Request(
        f"http://{traced_server.http_target}/v1/models/demo:classify",
        data=photos(quick_model, 1)[0],
        headers={"Content-Type": "image/jpeg", "traceparent": f"00-{trace_id}-{span_id}-01"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200

    class Caller:
        pass

    caller = Caller()
    caller.trace_id, caller.span_id = int(trace_id, 16), int(span_id, 16)  # type: ignore[attr-defined]
    call = check_call_trace(receiver, caller, "http:Classify", images=1)
    assert attributes(call.attributes)["rpc.method"] == "http:Classify"


def test_the_grpc_scoring_engine_carries_the_callers_trace_on_its_streams(
    traced_server: ServerProcess, receiver: Receiver, quick_model: dict[str, Path]
) -> None:
    paths = [str(p) for p in sorted((quick_model["data"] / "val").rglob("*.jpg"))[:6]]
    engine = GrpcEngine(traced_server.target, "demo", images_per_request=3, concurrency=2)
    tracer = TracerProvider().get_tracer("test-scoring")
    try:
        with tracer.start_as_current_span("scoring job") as span:
            rows = list(engine.score(paths))
    finally:
        engine.close()
    assert len(rows) == 6
    # The engine sends its requests on classifier.v1 streams: each request its own span,
    # all in the job's trace.
    trace_id = span.get_span_context().trace_id.to_bytes(16, "big")
    parent = span.get_span_context().span_id.to_bytes(8, "big")
    deadline = time.monotonic() + 10
    while True:
        calls = [
            s for s in receiver.trace(trace_id, {"StreamClassify"}) if s.name == "StreamClassify"
        ]
        if len(calls) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(calls) == 2  # one per request of 3 images
    assert all(c.parent_span_id == parent for c in calls)
