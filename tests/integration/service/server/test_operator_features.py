"""What Triton and KServe operators rely on, against one real server with two worker
processes and two versions of the quick model, driven by the real tritonclient (gRPC and
HTTP): the statistics extension (counts that add up across workers and agree with
/metrics; stages that add up to the request time), ModelStreamInfer, weighted traffic
between versions (published through the repository API, followed by both workers,
surviving a reload, never reaching a retired version), and the prediction series."""

from __future__ import annotations

import json
import math
import queue
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from tests.integration.service.conftest import ServerProcess, copy_model, replace_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


@pytest.fixture(scope="module")
def server(
    quick_model: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("two-versions")
    for version in (1, 2):
        copy_model(quick_model["model"], repository, "demo", version)
    process = ServerProcess(
        repository,
        "--version-policy",
        "all",
        "--repository-poll-seconds",
        "0.5",
        "--repository-settle-seconds",
        "0",
        workers=2,
    )
    try:
        deadline = time.monotonic() + 90
        while sum(m == "worker serving" for m in process.messages()) < 2:  # both workers
            assert time.monotonic() < deadline, process.messages()[-5:]
            time.sleep(0.2)
        yield process
    finally:
        process.kill()


def photos(quick_model: dict[str, Path], count: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted((quick_model["data"] / "val").rglob("*.jpg"))[:count]]


def bytes_input(module: Any, images: list[bytes]) -> Any:
    tensor = module.InferInput("image_bytes", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def grpc_stats(server: ServerProcess, version: str) -> Any:
    """Over a new connection each time: it may reach either worker."""
    client = tgrpc.InferenceServerClient(server.target, channel_args=OWN_CONNECTION)
    try:
        (stats,) = client.get_inference_statistics("demo", version).model_stats
        return stats
    finally:
        client.close()


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if not match or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match[3])
    return total


def served_by(server: ServerProcess, method: str) -> Counter[tuple[object, object]]:
    """(worker, version) of each access-log line of ``method``."""
    return Counter(
        (e.get("worker"), e.get("version")) for e in server.events if e.get("method") == method
    )


def test_statistics_add_up_across_workers_and_agree_with_metrics(
    server: ServerProcess, quick_model: dict[str, Path]
) -> None:
    images = photos(quick_model, 2)
    before = grpc_stats(server, "1")
    calls, client_seconds = 24, 0.0
    for _ in range(calls):
        # A connection of its own each call (grpc otherwise shares one between channels
        # to the same target), so the kernel spreads the calls over both workers.
        client = tgrpc.InferenceServerClient(server.target, channel_args=OWN_CONNECTION)
        client.is_server_ready()  # connected before the clock starts
        started = time.perf_counter()
        client.infer("demo", [bytes_input(tgrpc, images)], model_version="1")
        client_seconds += time.perf_counter() - started
        client.close()
    workers = {worker for worker, _ in served_by(server, "ModelInfer")}
    assert workers == {0, 1}, "the calls should have reached both workers"

    after = grpc_stats(server, "1")
    success = after.inference_stats.success
    assert success.count - before.inference_stats.success.count == calls
    assert after.inference_count - before.inference_count == 2 * calls
    executed = sum(b.batch_size * b.compute_infer.count for b in after.batch_stats)
    executed -= sum(b.batch_size * b.compute_infer.count for b in before.batch_stats)
    assert executed == 2 * calls
    server_ns = success.ns - before.inference_stats.success.ns
    stage_ns = sum(
        getattr(after.inference_stats, s).ns - getattr(before.inference_stats, s).ns for s in STAGES
    )
    # The stages follow each other inside the request: within 10% of its server time,
    # and the server's time within what the client measured around the calls.
    assert 0.9 * server_ns <= stage_ns <= server_ns
    assert 0.3 * client_seconds * 1e9 < server_ns <= client_seconds * 1e9

    # Whichever worker answers, the same numbers; HTTP and /metrics agree with gRPC.
    for _ in range(4):
        again = grpc_stats(server, "1")
        assert again.inference_stats.success.count == success.count
        assert again.inference_count == after.inference_count
    http = thttp.InferenceServerClient(server.http_target)
    (rest,) = http.get_inference_statistics("demo", "1")["model_stats"]
    assert rest["inference_stats"]["success"]["count"] == success.count
    assert rest["execution_count"] == after.execution_count
    text = server.metrics_text()
    assert (
        metric_value(
            text, "classifier_request_stats_total", model="demo", version="1", stat="success"
        )
        == success.count
    )
    assert metric_value(text, "classifier_images_total", model="demo", version="1") == (
        after.inference_count
    )
    assert (
        metric_value(text, "classifier_batch_executions_total", model="demo", version="1")
        == after.execution_count
    )
    assert "statistics" in http.get_server_metadata()["extensions"]


def test_a_stream_answers_every_request_with_its_id_and_errors_on_their_own(
    server: ServerProcess, quick_model: dict[str, Path]
) -> None:
    images = photos(quick_model, 5)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = tgrpc.InferenceServerClient(server.target)
    unary = client.infer("demo", [bytes_input(tgrpc, images[:1])], model_version="2")
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(10):
            batch = [b"junk"] if i == 4 else [images[i % len(images)]]
            client.async_stream_infer(
                "demo", [bytes_input(tgrpc, batch)], request_id=f"q{i}", model_version="2"
            )
        got = [answers.get(timeout=30) for _ in range(10)]
    finally:
        client.stop_stream()
        client.close()
    results = {r.get_response().id: r for r, e in got if e is None}
    errors = [e for r, e in got if e is not None]
    assert sorted(results) == sorted(f"q{i}" for i in range(10) if i != 4)
    assert len(errors) == 1 and "(request id q4)" in errors[0].message()
    assert "not a decodable image" in errors[0].message()
    assert np.allclose(
        results["q0"].as_numpy("probabilities"), unary.as_numpy("probabilities"), atol=1e-6
    )
    stream_calls = served_by(server, "ModelStreamInfer")
    assert sum(stream_calls.values()) == 10


def http_json(server: ServerProcess, path: str, body: object | None = None) -> Any:
    request = urllib.request.Request(
        f"http://{server.http_target}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "PUT",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def split_of(server: ServerProcess, image: bytes, calls: int) -> Counter[str]:
    """Versions that answered ``calls`` classify calls naming none, over 4 connections."""
    clients = [server.client() for _ in range(4)]
    try:
        return Counter(
            clients[i % 4].classify([image], model="demo")[0].version for i in range(calls)
        )
    finally:
        for client in clients:
            client.close()


def test_weighted_traffic_between_versions(
    server: ServerProcess, quick_model: dict[str, Path]
) -> None:
    image = photos(quick_model, 1)[0]
    assert split_of(server, image, 20) == Counter({"2": 20})  # no weights: the newest
    shown = http_json(server, "/v2/repository/models/demo/traffic", {"weights": {"1": 70, "2": 30}})
    assert shown["weights"] == {"1": 70.0, "2": 30.0}
    assert shown["ready_versions"] == ["1", "2"]
    time.sleep(1.2)  # the other worker looks at the traffic file once a second
    calls = 600
    split = split_of(server, image, calls)
    assert abs(split["2"] - 0.3 * calls) <= 4 * math.sqrt(calls * 0.3 * 0.7), split
    by_worker = {w for (w, v) in served_by(server, "Classify") if v == "1"}
    assert by_worker == {0, 1}, "both workers follow the published weights"

    # A reload of version 2 (its file replaced) keeps the weights.
    replace_file(server.repository / "demo" / "2" / "model.onnx", quick_model["model"])
    server.wait_for_event("model demo version 2: its file changed; reloaded", timeout=30)
    assert http_json(server, "/v2/repository/models/demo/traffic")["weights"] == {
        "1": 70.0,
        "2": 30.0,
    }
    # Version 2 leaves the repository: retired, it gets no new calls.
    (server.repository / "demo" / "2" / "model.onnx").rename(server.repository / "demo" / "2.gone")
    deadline = time.monotonic() + 30
    while http_json(server, "/v2/repository/models/demo/traffic")["ready_versions"] != ["1"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)  # both workers rescan every 0.5 s
    assert split_of(server, image, 40) == Counter({"1": 40})


def test_predictions_are_counted_by_class_and_score(server: ServerProcess) -> None:
    text = server.metrics_text()
    answered = metric_value(text, "classifier_images_total", model="demo")
    predicted = metric_value(text, "classifier_predictions_total", model="demo")
    scored = metric_value(text, "classifier_top1_score_count", model="demo")
    assert answered > 0 and predicted == answered == scored


def test_the_sdk_streams_answer_in_the_order_sent_sync_and_async(
    server: ServerProcess, quick_model: dict[str, Path]
) -> None:
    import asyncio

    from service.client import AsyncClassifierClient, StreamFailure, StreamItem

    images = photos(quick_model, 6)
    items = [
        StreamItem(
            [b"junk"] if i == 7 else [images[i % 6], images[(i + 1) % 6]], model="demo", version="1"
        )
        for i in range(20)
    ]
    with server.client() as client:
        expected = [
            client.classify(item.images, model="demo", version="1")
            for item in items
            if item.images != [b"junk"]
        ]
        answers = list(client.stream(iter(items), window=4))
    assert len(answers) == 20
    failure = answers.pop(7)
    assert isinstance(failure, StreamFailure) and failure.code == "INVALID_ARGUMENT"
    assert failure.reason == "invalid_image" and not failure.retryable
    for got, want in zip(answers, expected, strict=True):
        assert not isinstance(got, StreamFailure)
        assert [r.top.index for r in got] == [r.top.index for r in want]
        assert got[0].version == "1"

    async def in_asyncio() -> list[list[int]]:
        async with AsyncClassifierClient(server.target) as client:
            return [
                [r.top.index for r in a]  # type: ignore[union-attr]
                async for a in client.stream(items[:5], window=2)
            ]

    assert asyncio.run(in_asyncio()) == [[r.top.index for r in w] for w in expected[:5]]
