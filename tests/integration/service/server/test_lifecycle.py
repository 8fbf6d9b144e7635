"""Model lifecycle under load: versions published, corrupted and repaired while 8 callers
keep calling; SIGTERM drains. Real server subprocesses, real clients, real models.

Callers use plain gRPC channels without the SDK's retry policy, so a single refused call
counts as a failure.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.proto_gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from tests.integration.service.conftest import (
    ServerProcess,
    copy_model,
    publish,
    replace_file,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CALLERS = 8


@dataclass
class Calls:
    """What the callers saw: per caller, (time, version answered or status code name)."""

    by_caller: list[list[tuple[float, str]]] = field(default_factory=list)
    health: list[tuple[float, str]] = field(default_factory=list)

    def failures(self) -> list[tuple[float, str]]:
        return [(t, r) for calls in self.by_caller for t, r in calls if not r.isdigit()]

    def total(self) -> int:
        return sum(len(c) for c in self.by_caller)

    def latest_versions(self) -> set[str]:
        return {calls[-1][1] for calls in self.by_caller if calls}

    def first_time_of(self, version: str) -> float | None:
        times = [t for calls in self.by_caller for t, r in calls if r == version]
        return min(times) if times else None


@contextmanager
def under_load(
    server: ServerProcess, image: bytes, model: str = "demo", version: str = ""
) -> Iterator[Calls]:
    calls = Calls(by_caller=[[] for _ in range(CALLERS)])
    stop = threading.Event()

    def caller(seen: list[tuple[float, str]]) -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ImageClassifierStub(channel)
            request = pb.ClassifyRequest(
                model=model, version=version, images=[pb.Image(encoded=image)]
            )
            while not stop.is_set():
                try:
                    seen.append((time.monotonic(), stub.Classify(request, timeout=30).version))
                except grpc.RpcError as exc:
                    seen.append((time.monotonic(), f"{exc.code().name}: {exc.details()}"))

    def health() -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as exc:
                    name = exc.code().name
                calls.health.append((time.monotonic(), name))
                time.sleep(0.1)

    threads = [threading.Thread(target=caller, args=(seen,)) for seen in calls.by_caller]
    threads.append(threading.Thread(target=health))
    for thread in threads:
        thread.start()
    try:
        yield calls
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until ``condition()``; returns the time it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def states(server: ServerProcess) -> dict[str, tuple[str, str]]:
    with server.client() as client:
        return {m.version: (m.state, m.error) for m in client.list_models() if m.name == "demo"}


def corrupt(model: Path) -> bytes:
    data = model.read_bytes()
    return data[: len(data) // 3]


def report(name: str, figures: dict[str, object]) -> None:
    print(f"\n{name}: {json.dumps(figures)}")  # shown with pytest -s; quoted in notes


def test_latest_policy_swaps_versions_under_load_without_a_failed_call(
    start_server: type[ServerProcess], quick_model: dict[str, Path], tmp_path: Path
) -> None:
    model = quick_model["model"]
    copy_model(model, tmp_path, "demo", 1)
    server = start_server(tmp_path, "--repository-poll-seconds", "0.5")
    server.wait_for_event("serving")
    image = next((quick_model["data"] / "val").rglob("*.jpg")).read_bytes()
    started = time.monotonic()
    with under_load(server, image) as calls:
        time.sleep(3)
        published_v2 = time.monotonic()
        publish(model, tmp_path, "demo", 2)
        swapped_v2 = wait_until(lambda: calls.latest_versions() == {"2"}, 30, "v2 answers")

        publish(corrupt(model), tmp_path, "demo", 3)
        wait_until(lambda: states(server).get("3", ("",))[0] == "failed", 30, "v3 failed")
        time.sleep(3)  # several rescans: v3 is not retried while its file is unchanged
        assert calls.latest_versions() == {"2"}
        v3_state, v3_error = states(server)["3"]
        assert v3_state == "failed" and "cannot load" in v3_error

        repaired_v3 = time.monotonic()
        replace_file(tmp_path / "demo" / "3" / "model.onnx", model)
        swapped_v3 = wait_until(lambda: calls.latest_versions() == {"3"}, 30, "v3 answers")
        time.sleep(max(0.0, 30 - (time.monotonic() - started)))  # at least 30 s of load

    assert calls.failures() == []
    for seen in calls.by_caller:  # each caller moved forward only: 1 → 2 → 3
        versions = [int(r) for _, r in seen]
        assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == 3
    assert {status for _, status in calls.health} == {"SERVING"}
    wait_until(lambda: set(states(server)) == {"3"}, 30, "v1 and v2 unloaded")
    assert states(server)["3"] == ("ready", "")
    series = "\n".join(server.series())
    assert 'classifier_model_load_failures_total{model="demo"} 1.0' in series
    assert 'version="1"' not in series and 'version="2"' not in series  # unloaded: removed
    failed_lines = [m for m in server.messages() if m.startswith("model demo version 3 failed")]
    assert len(failed_lines) == 1  # one log line, not one per rescan
    report(
        "latest swap",
        {
            "calls": calls.total(),
            "failed": len(calls.failures()),
            "seconds": round(time.monotonic() - started, 1),
            "v2_publish_to_first_answer_s": round(
                (calls.first_time_of("2") or 0) - published_v2, 2
            ),
            "v2_publish_to_all_callers_s": round(swapped_v2 - published_v2, 2),
            "v3_repair_to_all_callers_s": round(swapped_v3 - repaired_v3, 2),
            "health_samples": len(calls.health),
            "health_not_serving": sum(s != "SERVING" for _, s in calls.health),
        },
    )


def test_all_policy_adds_versions_keeps_pinned_calls_and_survives_a_corrupt_rewrite(
    start_server: type[ServerProcess], quick_model: dict[str, Path], tmp_path: Path
) -> None:
    model = quick_model["model"]
    copy_model(model, tmp_path, "demo", 1)
    server = start_server(tmp_path, "--repository-poll-seconds", "0.5", "--version-policy", "all")
    server.wait_for_event("serving")
    image = next((quick_model["data"] / "val").rglob("*.jpg")).read_bytes()
    with under_load(server, image) as newest, under_load(server, image, version="1") as pinned:
        time.sleep(2)
        publish(model, tmp_path, "demo", 2)
        wait_until(lambda: newest.latest_versions() == {"2"}, 30, "v2 answers")
        publish(corrupt(model), tmp_path, "demo", 3)
        wait_until(lambda: states(server).get("3", ("",))[0] == "failed", 30, "v3 failed")
        # The served v1's file is overwritten with garbage: v1 keeps serving its loaded
        # copy and says why; a good file again is reloaded in place.
        replace_file(tmp_path / "demo" / "1" / "model.onnx", corrupt(model))
        wait_until(lambda: "failed to load" in states(server)["1"][1], 30, "v1 rewrite failed")
        assert states(server)["1"][0] == "ready"
        replace_file(tmp_path / "demo" / "1" / "model.onnx", model)
        wait_until(lambda: states(server)["1"] == ("ready", ""), 30, "v1 reloaded")
        time.sleep(2)
    assert newest.failures() == [] and pinned.failures() == []
    assert {r for calls in pinned.by_caller for _, r in calls} == {"1"}
    assert {s for _, s in newest.health + pinned.health} == {"SERVING"}
    final = states(server)
    assert final["1"] == final["2"] == ("ready", "") and final["3"][0] == "failed"
    report("all policy", {"calls": newest.total() + pinned.total(), "failed": 0})


def test_specific_policy_loads_a_listed_version_when_published_and_ignores_others(
    start_server: type[ServerProcess], quick_model: dict[str, Path], tmp_path: Path
) -> None:
    model = quick_model["model"]
    copy_model(model, tmp_path, "demo", 1)
    server = start_server(
        tmp_path,
        "--repository-poll-seconds",
        "0.5",
        "--version-policy",
        "specific",
        "--versions",
        '{"demo": [1, 2]}',
    )
    server.wait_for_event("serving")
    image = next((quick_model["data"] / "val").rglob("*.jpg")).read_bytes()
    with under_load(server, image) as calls:
        time.sleep(1)
        publish(model, tmp_path, "demo", 3)  # not listed: never loaded
        publish(model, tmp_path, "demo", 2)
        wait_until(lambda: calls.latest_versions() == {"2"}, 30, "v2 answers")
        time.sleep(2)
    assert calls.failures() == []
    assert set(states(server)) == {"1", "2"}
    assert {s for _, s in calls.health} == {"SERVING"}


def test_a_corrupt_newest_version_at_start_falls_back_to_the_previous_one(
    start_server: type[ServerProcess], quick_model: dict[str, Path], tmp_path: Path
) -> None:
    copy_model(quick_model["model"], tmp_path, "demo", 1)
    (tmp_path / "demo" / "2").mkdir()
    (tmp_path / "demo" / "2" / "model.onnx").write_bytes(corrupt(quick_model["model"]))
    (tmp_path / "demo" / ".3-in-progress").mkdir()  # a publish in progress: never read
    (tmp_path / "demo" / ".3-in-progress" / "model.onnx").write_bytes(b"partial")
    server = start_server(tmp_path)
    server.wait_for_event("serving")
    assert states(server) == {
        "1": ("ready", ""),
        "2": ("failed", states(server)["2"][1]),
    }
    with server.client() as client:
        assert client.health() == "SERVING"
        image = next((quick_model["data"] / "val").rglob("*.jpg"))
        assert len(client.classify([image], model="demo")) == 1


def test_sigterm_drains_visibly_then_finishes_in_flight_calls_and_exits_zero(
    start_server: type[ServerProcess], quick_model: dict[str, Path]
) -> None:
    # A 1.5 s batching delay keeps calls in flight when SIGTERM arrives.
    server = start_server(
        quick_model["repository"],
        "--drain-seconds",
        "3",
        "--max-queue-delay-us",
        "1500000",
        "--max-batch-size",
        "64",
    )
    server.wait_for_event("serving")
    image = next((quick_model["data"] / "val").rglob("*.jpg")).read_bytes()
    request = pb.ClassifyRequest(model="demo", images=[pb.Image(encoded=image)] * 2)
    results: list[object] = []

    def call() -> None:
        with grpc.insecure_channel(server.target) as channel:
            try:
                results.append(pb_grpc.ImageClassifierStub(channel).Classify(request, timeout=30))
            except grpc.RpcError as exc:
                results.append(exc)

    in_flight = [threading.Thread(target=call) for _ in range(4)]
    for thread in in_flight:
        thread.start()
    time.sleep(0.5)
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        classify = pb_grpc.ImageClassifierStub(channel)

        def status(service: str = "") -> str:
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))

        assert status() == "SERVING"
        signalled = time.monotonic()
        server.process.send_signal(15)
        wait_until(lambda: status() == "NOT_SERVING", 1.0, "NOT_SERVING after SIGTERM")
        assert status("classifier.v1.ImageClassifier") == "NOT_SERVING"
        assert status("liveness") == "SERVING"  # draining is not dead
        during_drain = classify.Classify(request, timeout=30)  # the port still answers
        assert len(during_drain.results) == 2
        assert time.monotonic() - signalled < 3.0  # all of that within the drain
    assert server.process.wait(30) == 0
    for thread in in_flight:
        thread.join(30)
    assert len(results) == 4
    assert all(isinstance(r, pb.ClassifyResponse) and len(r.results) == 2 for r in results)
    messages = server.messages()
    assert messages.index("draining") < messages.index("shutting down")
