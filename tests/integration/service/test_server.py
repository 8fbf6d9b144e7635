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

from service.client import ClassifierClient
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.proto_gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from tests.integration.service.conftest import ServerProcess, copy_model
from tests.unit.service.test_preprocess import bomb_png
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
        assert "images per request is 65, over the limit of 64" in str(info.value.details())
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


def test_deadline_exceeded(demo_server: ServerProcess, quick_model: dict[str, Path]) -> None:
    path = val_samples(quick_model)[0].path
    with demo_server.client() as client, pytest.raises(grpc.RpcError) as info:
        client.classify([path] * 32, timeout=0.0005)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_queue_full_is_refused_at_once(
    start_server: type[ServerProcess], quick_model: dict[str, Path]
) -> None:
    server = start_server(quick_model["repository"], "--max-queue-size", "4")
    server.wait_for_event("serving")
    path = val_samples(quick_model)[0].path
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as info:
            client.classify([path] * 5)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the limit is 4" in str(info.value.details())
        assert len(client.classify([path] * 4)) == 4


def test_token_authentication(
    start_server: type[ServerProcess], quick_model: dict[str, Path]
) -> None:
    server = start_server(quick_model["repository"], "--auth-token", "s3cret")
    server.wait_for_event("serving")
    path = val_samples(quick_model)[0].path
    with server.client() as anonymous:
        assert anonymous.health() == "SERVING"  # probes need no token
        with pytest.raises(grpc.RpcError) as info:
            anonymous.classify([path])
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with server.client(token="wrong") as wrong, pytest.raises(grpc.RpcError):
        wrong.classify([path])
    with server.client(token="s3cret") as client:
        assert len(client.classify([path])) == 1


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


def test_sigterm_lets_in_flight_requests_finish_and_exits_zero(
    start_server: type[ServerProcess], quick_model: dict[str, Path]
) -> None:
    # A 1.5 s batching delay keeps requests in flight when SIGTERM arrives.
    server = start_server(
        quick_model["repository"], "--max-queue-delay-us", "1500000", "--max-batch-size", "64"
    )
    server.wait_for_event("serving")
    path = val_samples(quick_model)[0].path
    results: list[object] = []

    def call() -> None:
        with ClassifierClient(server.target, timeout=30) as client:
            try:
                results.append(client.classify([path, path]))
            except grpc.RpcError as exc:
                results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    assert server.terminate(timeout=30) == 0
    for thread in threads:
        thread.join(30)
    assert len(results) == 4
    assert all(isinstance(r, list) and len(r) == 2 for r in results), results
    assert "shutting down" in server.messages()


def test_serving_code_never_imports_torch() -> None:
    code = (
        "import sys; import service.server, service.client, service.pipeline, "
        "service.__main__; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'torchvision' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
