"""The gRPC server end to end: real subprocess servers, real clients, a real exported model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image

from service.client import error_reason, is_retryable, request_id
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.proto_gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from tests.integration.service.conftest import ServerProcess, copy_model
from tests.unit.service.model.test_preprocess import bomb_png
from training.data import load_dataset
from training.evaluate import evaluate_onnx
from training.metrics import box_iou

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in body.splitlines():
        if not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        metric_name, _, label_text = key.partition("{")
        got = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if metric_name == name and all(part in got for part in want.split(",") if part):
            total += float(value)
    return total


def val_samples(quick_model: dict[str, Path]) -> list:  # type: ignore[type-arg]
    index = load_dataset(quick_model["data"], splits=("val",), verify=False)
    return index.splits["val"].samples


def test_grpc_answers_match_offline_evaluation_and_boxes_land_on_digits(
    demo_server: ServerProcess, quick_model: dict[str, Path]
) -> None:
    samples = val_samples(quick_model)
    chunks = [samples[i : i + 10] for i in range(0, len(samples), 10)]

    def localize(chunk: list) -> list:  # type: ignore[type-arg]
        with demo_server.client() as client:
            return client.localize([s.path for s in chunk], model="demo", top_k=3)

    with ThreadPoolExecutor(8) as pool:  # concurrent requests: the batcher forms batches
        results = [r for chunk_results in pool.map(localize, chunks) for r in chunk_results]
    labels = np.array([s.label for s in samples])
    predicted = np.array([int(r.top.label) for r in results])
    offline = evaluate_onnx(quick_model["model"], quick_model["data"])
    assert float((predicted == labels).mean()) == pytest.approx(offline["top1"], abs=1e-9)
    iou = box_iou(np.array([r.box.as_tuple() for r in results]), np.array([s.box for s in samples]))
    assert float((iou >= 0.5).mean()) >= 0.80
    assert {r.box_source for r in results} == {"regression"}
    assert metric(demo_server, "classifier_batch_size_sum") > metric(
        demo_server, "classifier_batch_size_count"
    )  # some batches held > 1 image

    with demo_server.client() as client:
        classified = client.classify([s.path for s in samples[:20]], model="demo")
    assert [int(c.top.label) for c in classified] == list(predicted[:20])


def test_raw_images_pil_and_numpy_inputs(
    demo_server: ServerProcess, quick_model: dict[str, Path]
) -> None:
    path = val_samples(quick_model)[0].path
    with Image.open(path) as image:
        pil = image.convert("RGB")
    with demo_server.client() as client:
        by_path, by_pil, by_array = client.classify([path, pil, np.asarray(pil)])
    assert by_path.top.label == by_pil.top.label == by_array.top.label
    assert by_pil.top.score == pytest.approx(by_array.top.score, abs=1e-6)


def test_heatmap_and_model_info(demo_server: ServerProcess, quick_model: dict[str, Path]) -> None:
    path = val_samples(quick_model)[0].path
    with demo_server.client() as client:
        (result,) = client.localize([path], include_heatmap=True)
        info = client.get_model("demo")
        models = client.list_models()
    width, height = Image.open(path).size
    hm = result.heatmap
    assert hm is not None and max(hm.width, hm.height) <= 224
    assert hm.width / hm.height == pytest.approx(width / height, rel=0.05)
    assert float(hm.values.min()) >= 0.0 and float(hm.values.max()) <= 1.0
    assert info.name == "demo" and info.version == "1" and info.state == "ready"
    assert info.has_boxes and info.has_cam and list(info.labels) == [str(d) for d in range(10)]
    assert [(m.name, m.version) for m in models] == [("demo", "1")]


def test_docker_healthcheck_command_against_a_real_server(demo_server: ServerProcess) -> None:
    from tests.unit.deploy.test_deploy_files import dockerfile_instruction

    command = json.loads(dockerfile_instruction("HEALTHCHECK", "cpu").split("CMD", 1)[1])
    command = [demo_server.target if arg == "127.0.0.1:50051" else arg for arg in command]
    assert command[0] == "python"
    done = subprocess.run(
        [sys.executable, *command[1:]], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "SERVING"


def test_health_reflection_and_metrics(
    demo_server: ServerProcess, quick_model: dict[str, Path]
) -> None:
    with demo_server.client() as client:
        assert client.health() == "SERVING"
        assert client.health("classifier.v1.ImageClassifier") == "SERVING"
        assert client.health("liveness") == "SERVING"
        before = metric(demo_server, "classifier_requests_total", method="Classify", code="OK")
        images_before = metric(demo_server, "classifier_images_total", model="demo")
        client.classify([val_samples(quick_model)[1].path] * 3)
    assert (
        metric(demo_server, "classifier_requests_total", method="Classify", code="OK") == before + 1
    )
    assert metric(demo_server, "classifier_images_total", model="demo") == images_before + 3
    assert metric(demo_server, "classifier_model_ready", model="demo", version="1") == 1
    assert metric(demo_server, "classifier_preprocess_duration_seconds_count") >= 3
    with grpc.insecure_channel(demo_server.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "classifier.v1.ImageClassifier" in services
    assert "grpc.health.v1.Health" in services


def _code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    raise AssertionError("the call succeeded")


def test_bad_inputs_get_the_right_status_and_the_server_stays_healthy(
    demo_server: ServerProcess, quick_model: dict[str, Path]
) -> None:
    good = val_samples(quick_model)[0].path.read_bytes()
    truncated = good[: len(good) // 2]
    wrong_raw = pb.Image(raw=pb.RawImage(height=10, width=10, rgb=b"\x00" * 299))
    with grpc.insecure_channel(demo_server.target) as channel:
        stub = pb_grpc.ImageClassifierStub(channel)

        def classify(*images: pb.Image, model: str = "demo", version: str = "") -> object:
            return lambda: stub.Classify(
                pb.ClassifyRequest(model=model, version=version, images=list(images)), timeout=30
            )

        cases = {
            "empty bytes": (classify(pb.Image(encoded=b"")), grpc.StatusCode.INVALID_ARGUMENT),
            "random bytes": (
                classify(pb.Image(encoded=np.random.default_rng(0).bytes(4096))),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            "truncated jpeg": (
                classify(pb.Image(encoded=truncated)),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            "bomb png": (
                classify(pb.Image(encoded=bomb_png(30000, 30000))),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ),
            "too many images": (
                classify(*[pb.Image(encoded=good)] * 65),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ),
            "no images": (classify(), grpc.StatusCode.INVALID_ARGUMENT),
            "unknown model": (
                classify(pb.Image(encoded=good), model="nope"),
                grpc.StatusCode.NOT_FOUND,
            ),
            "unknown version": (
                classify(pb.Image(encoded=good), version="7"),
                grpc.StatusCode.NOT_FOUND,
            ),
            "raw wrong size": (classify(wrong_raw), grpc.StatusCode.INVALID_ARGUMENT),
            "neither": (classify(pb.Image()), grpc.StatusCode.INVALID_ARGUMENT),
        }
        got = {name: _code(call) for name, (call, _) in cases.items()}
        assert got == {name: code for name, (_, code) in cases.items()}

        # Messages say what was wrong and the limit.
        with pytest.raises(grpc.RpcError) as info:
            classify(*[pb.Image(encoded=good)] * 65)()  # type: ignore[operator]
        details = str(info.value.details())
        assert "images per request is 65, over the limit of 64 (max_images_per_request)" in details
        assert error_reason(info.value) == "limit" and not is_retryable(info.value)
        with pytest.raises(grpc.RpcError) as info:
            classify(pb.Image(encoded=good), pb.Image(encoded=truncated))()  # type: ignore[operator]
        assert "image 1:" in str(info.value.details())

    with demo_server.client() as client:
        assert client.health() == "SERVING"
        assert len(client.classify([good])) == 1


def test_large_message_within_limits_is_accepted(demo_server: ServerProcess) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG", compress_level=0)
    data = buffer.getvalue()
    assert len(data) > 6 * 1024 * 1024  # above gRPC's 4 MiB default
    with demo_server.client() as client:
        assert len(client.classify([data])) == 1


def test_deadline_exceeded(start_server: type[ServerProcess], quick_model: dict[str, Path]) -> None:
    # A 2 s batching delay: the call's 0.5 s deadline passes while its images wait in the
    # server's queue; the collector finds them expired and counts them as "deadline".
    server = start_server(
        quick_model["repository"], "--max-queue-delay-us", "2000000", "--max-batch-size", "64"
    )
    server.wait_for_event("serving")
    path = val_samples(quick_model)[0].path
    with server.client() as client:
        client.classify([path] * 64)  # a full batch goes at once: warms the pools up
        with pytest.raises(grpc.RpcError) as info:
            client.classify([path] * 3, timeout=0.5)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while metric(server, "classifier_dropped_images_total", reason="deadline") < 3:
        assert time.monotonic() < deadline, server.metrics_text()
        time.sleep(0.1)
    assert metric(server, "classifier_dropped_images_total", reason="cancelled") == 0
    assert metric(server, "classifier_requests_total", code="DEADLINE_EXCEEDED") == 1


def test_queue_full_is_refused_at_once_before_decoding(
    start_server: type[ServerProcess], quick_model: dict[str, Path]
) -> None:
    server = start_server(
        quick_model["repository"],
        "--max-queue-size",
        "4",
        "--max-images-per-request",
        "4",
        "--max-queue-delay-us",
        "2000000",
        "--max-batch-size",
        "8",
    )
    server.wait_for_event("serving")
    path = val_samples(quick_model)[0].path
    with server.client() as first, server.client() as second:
        pending = threading.Thread(target=lambda: first.classify([path] * 4))
        pending.start()  # four images wait 2 s for a batch: the queue is full
        time.sleep(0.5)
        decoded = metric(server, "classifier_preprocess_duration_seconds_count")
        with pytest.raises(grpc.RpcError) as info:
            second.classify([path])
        pending.join(30)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the limit is 4 (max_queue_size); retry later" in str(info.value.details())
    assert error_reason(info.value) == "queue_full" and is_retryable(info.value)
    assert decoded == 4  # refused before its image was decoded
    assert metric(server, "classifier_preprocess_duration_seconds_count") == 4


def test_calls_naming_unknown_models_add_no_series(demo_server: ServerProcess) -> None:
    with grpc.insecure_channel(demo_server.target) as channel:
        stub = pb_grpc.ImageClassifierStub(channel)
        image = pb.Image(encoded=b"x")

        def call(i: int) -> grpc.StatusCode:
            try:
                stub.Classify(pb.ClassifyRequest(model=f"m{i}", images=[image]), timeout=10)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        call(-1)  # the _unknown series exist from the first such call on
        before = len(demo_server.series())
        with ThreadPoolExecutor(8) as pool:
            codes = set(pool.map(call, range(1000)))
    assert codes == {grpc.StatusCode.NOT_FOUND}
    series = demo_server.series()
    assert len(series) == before
    models = {part.split('"')[1] for line in series for part in line.split(",") if "model=" in part}
    assert models <= {"demo", "_unknown", ""}  # "": ListModels, which names no model


def test_request_ids_and_the_access_log(
    demo_server: ServerProcess, quick_model: dict[str, Path]
) -> None:
    path = val_samples(quick_model)[0].path
    with grpc.insecure_channel(demo_server.target) as channel:
        stub = pb_grpc.ImageClassifierStub(channel)
        request = pb.ClassifyRequest(model="demo", images=[pb.Image(encoded=path.read_bytes())])
        _, call = stub.Classify.with_call(request, metadata=[("x-request-id", "job-42")])
        assert ("x-request-id", "job-42") in call.trailing_metadata()
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(model="demo", images=[pb.Image(encoded=b"?")]))
    generated = request_id(info.value)
    assert generated and f"(request id {generated})" in str(info.value.details())
    assert error_reason(info.value) == "invalid_image"
    deadline = time.monotonic() + 10
    while not any(e.get("request_id") == generated for e in demo_server.events):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ok = next(e for e in demo_server.events if e.get("request_id") == "job-42")
    bad = next(e for e in demo_server.events if e.get("request_id") == generated)
    assert ok["msg"] == "Classify OK" and ok["level"] == "INFO"
    assert (ok["model"], ok["version"], ok["images"], ok["code"]) == ("demo", "1", 1, "OK")
    assert str(ok["peer"]).startswith("ipv4:127.0.0.1:")
    assert float(ok["ms"]) > 0  # type: ignore[arg-type]
    assert bad["code"] == "INVALID_ARGUMENT" and "not a decodable image" in str(bad["error"])


def test_connections_are_recycled_after_their_maximum_age_without_failed_calls(
    start_server: type[ServerProcess], quick_model: dict[str, Path]
) -> None:
    server = start_server(
        quick_model["repository"],
        "--max-connection-age-seconds",
        "1",
        "--max-connection-age-grace-seconds",
        "1",
    )
    server.wait_for_event("serving")
    path = val_samples(quick_model)[0].path
    with server.client() as client:  # one long-lived channel, as a real client has
        results = []
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            results.append(len(client.classify([path])))
            time.sleep(0.05)
    assert set(results) == {1}
    peers = {e["peer"] for e in server.events if e.get("msg") == "Classify OK"}
    assert len(peers) >= 3  # reconnected (and re-resolved) at least twice


def test_health_turns_serving_only_after_a_model_is_loaded_and_warm(
    start_server: type[ServerProcess], quick_model: dict[str, Path], tmp_path: Path
) -> None:
    server = start_server(tmp_path, "--repository-poll-seconds", "0.2")
    path = val_samples(quick_model)[0].path
    with server.client() as client:
        assert client.health() == "NOT_SERVING"
        assert client.health("liveness") == "SERVING"  # alive, just not ready yet
        with pytest.raises(grpc.RpcError) as info:
            client.classify([path], model="demo")
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        copy_model(quick_model["model"], tmp_path, "demo", 1)
        server.wait_for_event("serving", timeout=60)
        assert client.health() == "SERVING"
        assert len(client.classify([path], model="demo")) == 1
    messages = server.messages()
    warmed = next(i for i, m in enumerate(messages) if m.startswith("warmed up"))
    assert warmed < messages.index("serving")


def test_versions_policies_and_a_broken_model(
    start_server: type[ServerProcess], quick_model: dict[str, Path], tmp_path: Path
) -> None:
    for version in (1, 2):
        copy_model(quick_model["model"], tmp_path, "demo", version)
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    server = start_server(tmp_path, "--version-policy", "all")
    server.wait_for_event("serving")
    path = val_samples(quick_model)[0].path
    with server.client() as client:
        models = {(m.name, m.version): m for m in client.list_models()}
        assert models[("demo", "1")].state == models[("demo", "2")].state == "ready"
        assert models[("broken", "1")].state == "failed"
        assert "cannot load" in models[("broken", "1")].error
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ImageClassifierStub(channel)
            image = pb.Image(encoded=path.read_bytes())
            newest = stub.Classify(pb.ClassifyRequest(model="demo", images=[image]))
            pinned = stub.Classify(pb.ClassifyRequest(model="demo", version="1", images=[image]))
            assert (newest.version, pinned.version) == ("2", "1")
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(pb.ClassifyRequest(model="broken", images=[image]))
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert metric(server, "classifier_model_load_failures_total", model="broken") == 1


def test_serving_code_never_imports_torch() -> None:
    code = (
        "import sys; import service.server.main, service.client, service.model.offline, "
        "service.__main__; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'torchvision' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_cli_splits_a_long_list_of_images_into_requests_under_the_limit(
    demo_server: ServerProcess, quick_model: dict[str, Path]
) -> None:
    """70 images exceed the server's 64 per request; the CLI sends them in requests of
    32 and prints one answer per image, in order."""
    images = sorted((quick_model["data"] / "val").rglob("*.jpg"))[:70]

    def calls() -> list[dict[str, object]]:
        return [e for e in demo_server.events if e.get("msg") == "Classify OK"]

    before = len(calls())
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.client",
            "--target",
            demo_server.target,
            "--json",
            "classify",
            *map(str, images),
            "--top-k",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    assert [a["image"] for a in answers] == [str(p) for p in images]
    deadline = time.monotonic() + 10  # the log lines arrive through a pipe
    while len(calls()) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["images"] for e in calls()[before:]] == [32, 32, 6]
