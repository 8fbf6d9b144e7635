"""Worker processes on one port: they share it and all answer, a killed worker is replaced,
SIGTERM drains every worker, metrics add up across them, and hot reload reaches each."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.processes import alive
from service.model.cores import cpu_count
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.proto_gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from service.server.config_loading import load_settings
from service.server.workers import Supervisor
from tests.integration.service.conftest import ServerProcess, copy_model, publish

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def photo(quick_model: dict[str, Path]) -> bytes:
    return next((quick_model["data"] / "val").rglob("*.jpg")).read_bytes()


def answering_workers(server: ServerProcess) -> set[int]:
    return {
        int(e["worker"])  # type: ignore[call-overload]
        for e in server.events
        if e.get("msg") == "Classify OK" and "worker" in e
    }


def classify_on_fresh_connections(server: ServerProcess, image: bytes, count: int) -> list[str]:
    """Each call on a new connection, so the kernel spreads them over the workers."""
    versions = []
    for _ in range(count):
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(server.target, options=options) as channel:
            stub = pb_grpc.ImageClassifierStub(channel)
            request = pb.ClassifyRequest(model="demo", images=[pb.Image(encoded=image)])
            versions.append(stub.Classify(request, timeout=30).version)
    return versions


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def series_total(server: ServerProcess, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in server.series() if line.startswith(name))


def test_workers_share_the_ports_answer_and_add_up_their_metrics(
    start_server: type[ServerProcess], quick_model: dict[str, Path]
) -> None:
    # No --workers, as `make serve` starts it: one worker per core (on a CPU-only
    # onnxruntime, whose AzureExecutionProvider is no GPU).
    if cpu_count() < 2:
        pytest.skip("one core: the default is a single process")
    server = start_server(quick_model["repository"], workers=None)
    listening = server.wait_for_event("serving")
    assert listening["workers"] == cpu_count()
    image = photo(quick_model)
    versions = classify_on_fresh_connections(server, image, 40)
    assert set(versions) == {"1"}
    everyone = set(range(cpu_count()))
    wait_for(lambda: answering_workers(server) == everyone, 10, "every worker to answer")
    # The SDK spreads one client's calls over its channels, so one client reaches both.
    with server.client(channels=4) as client:
        for _ in range(8):
            assert len(client.classify([image, image])) == 2
    assert series_total(server, "classifier_requests_total") == 48
    assert series_total(server, "classifier_images_total") == 40 + 16
    ready = [line for line in server.series() if line.startswith("classifier_model_ready")]
    assert ready == ['classifier_model_ready{model="demo",version="1"} 1.0']
    status, body = _http(server, "/v2/health/ready")
    assert (status, body) == (200, b'{"ready":true}')


def _http(server: ServerProcess, path: str) -> tuple[int, bytes]:
    import urllib.request

    with urllib.request.urlopen(f"http://{server.http_target}{path}", timeout=10) as response:
        return response.status, response.read()


def worker_pids(server: ServerProcess) -> dict[int, int]:
    pids: dict[int, int] = {}
    for message in server.messages():  # "worker 1 started (pid 1234)"
        if message.startswith("worker ") and " started (pid " in message:
            index = int(message.split()[1])
            pids[index] = int(message.rsplit(" ", 1)[1].rstrip(")"))
    return pids


def test_a_killed_worker_is_replaced_and_costs_no_call_under_load(
    start_server: type[ServerProcess], quick_model: dict[str, Path]
) -> None:
    # The default path (no --workers, as `make serve`), under load from the SDK: the
    # supervisor replaces a worker killed with SIGKILL and no call fails (the SDK's
    # channels retry what the dead worker's connections lose).
    if cpu_count() < 2:
        pytest.skip("one core: the default is a single process")
    server = start_server(quick_model["repository"], workers=None)
    server.wait_for_event("serving")
    image = photo(quick_model)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def load() -> None:
        with server.client(channels=4) as client:
            while not stop.is_set():
                try:
                    client.classify([image])
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    outcomes[code] += 1

    with ThreadPoolExecutor(4) as pool:
        callers = [pool.submit(load) for _ in range(4)]
        try:
            wait_for(lambda: outcomes["OK"] >= 50, 30, "the load to start")
            victim = worker_pids(server)[1]
            os.kill(victim, signal.SIGKILL)
            wait_for(
                lambda: any("exited with -9; restarting" in m for m in server.messages()),
                15,
                "the supervisor to reap worker 1",
            )
            # Until the kernel has closed the dead worker's listening socket, a fresh
            # connection routed there is reset (SO_REUSEPORT); once reaped, fresh
            # connections reach the live workers only.
            assert set(classify_on_fresh_connections(server, image, 10)) == {"1"}
            wait_for(lambda: worker_pids(server)[1] != victim, 15, "worker 1 to be restarted")
            wait_for(
                lambda: (
                    sum(1 for m in server.messages() if m == "worker serving") >= cpu_count() + 1
                ),
                30,
                "the new worker to serve",
            )
            served = outcomes["OK"]
            wait_for(lambda: outcomes["OK"] >= served + 50, 30, "calls after the restart")
        finally:
            stop.set()
            for caller in callers:
                caller.result()
    assert set(outcomes) == {"OK"}, outcomes
    assert series_total(server, "classifier_worker_restarts_total") == 1
    with server.client(channels=4) as client:
        assert client.health() == "SERVING"


def test_sigterm_drains_every_worker_and_exits_zero(
    start_server: type[ServerProcess], quick_model: dict[str, Path]
) -> None:
    server = start_server(quick_model["repository"], "--workers", "2", "--drain-seconds", "2")
    server.wait_for_event("serving")
    server.process.send_signal(signal.SIGTERM)
    answers = set()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # new connections: each reaches one of the workers
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(server.target, options=options) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            answers.add(response.status)
    assert answers == {health_pb2.HealthCheckResponse.NOT_SERVING}
    assert server.process.wait(30) == 0
    stopped = [e for e in server.events if e.get("msg") == "stopped" and "worker" in e]
    assert sorted(int(e["worker"]) for e in stopped) == [0, 1]  # type: ignore[call-overload]


def test_hot_reload_reaches_every_worker_and_unloaded_series_leave(
    start_server: type[ServerProcess], quick_model: dict[str, Path], tmp_path: Path
) -> None:
    copy_model(quick_model["model"], tmp_path, "demo", 1)
    server = start_server(tmp_path, "--workers", "2", "--repository-poll-seconds", "0.3")
    server.wait_for_event("serving")
    image = photo(quick_model)
    classify_on_fresh_connections(server, image, 6)
    publish(quick_model["model"], tmp_path, "demo", 2)
    wait_for(
        lambda: set(classify_on_fresh_connections(server, image, 10)) == {"2"},
        40,
        "every worker to serve version 2",
    )
    wait_for(
        lambda: not any('version="1"' in line for line in server.series()),
        20,
        "version 1's series to leave /metrics",
    )


def test_workers_that_keep_crashing_stop_the_server_with_an_error(tmp_path: Path) -> None:
    settings = load_settings(
        model_repository=tmp_path, port=0, http_port=None, metrics_port=None, drain_seconds=0
    )

    def crash(*args: object) -> None:
        sys.exit(3)

    started = time.monotonic()
    assert Supervisor(settings, 2, worker_main=crash).run() == 1
    assert time.monotonic() - started < 30  # gave up rather than looping for ever


def test_workers_exit_when_the_supervisor_is_killed_and_the_next_one_sweeps_its_files(
    start_server: type[ServerProcess], quick_model: dict[str, Path], tmp_path: Path
) -> None:
    """SIGKILL leaves the supervisor no chance to forward anything; the kernel tells each
    worker instead, and no orphan keeps the port. Nor can it remove its metrics files: the
    next supervisor on the same temporary directory does, once no worker holds them."""
    env = {"TMPDIR": str(tmp_path)}
    args = ("--workers", "2", "--drain-seconds", "0.5")
    server = start_server(quick_model["repository"], *args, env=env)
    server.wait_for_event("serving")
    pids = list(worker_pids(server).values())
    assert len(pids) == 2 and all(alive(p) for p in pids)
    [killed_dir] = tmp_path.glob("imgclf-workers-*")
    server.process.kill()
    server.process.wait(10)
    wait_for(lambda: not any(alive(p) for p in pids), 30, "the orphaned workers to exit")
    assert killed_dir.is_dir() and any(killed_dir.glob("counter_*.db"))  # left behind

    second = start_server(quick_model["repository"], *args, env=env)
    [own_dir] = tmp_path.glob("imgclf-workers-*")
    assert own_dir != killed_dir
    second.wait_for_event("serving")
    assert second.terminate() == 0
    assert list(tmp_path.glob("imgclf-workers-*")) == []  # a clean exit removes its own
