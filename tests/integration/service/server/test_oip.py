"""The Open Inference Protocol front door, driven by the real tritonclient (gRPC and HTTP)
and by curl-like plain HTTP: the answers equal classifier.v1's for the same images."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from service.model.image_header import ImageLimits
from service.model.preprocess import preprocess_encoded
from service.model.sessions import read_metadata
from service.model.spec import ModelSpec
from tests.integration.service.conftest import ServerProcess, copy_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def photos(quick_model: dict[str, Path], count: int = 6) -> list[bytes]:
    return [p.read_bytes() for p in sorted((quick_model["data"] / "val").rglob("*.jpg"))[:count]]


def bytes_input(module: Any, images: list[bytes]) -> Any:
    tensor = module.InferInput("image_bytes", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def http_get(server: ServerProcess, path: str, **headers: str) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://{server.http_target}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def http_post(
    server: ServerProcess, path: str, body: bytes, content_type: str, **headers: str
) -> tuple[int, Any, dict[str, str]]:
    request = urllib.request.Request(
        f"http://{server.http_target}{path}",
        data=body,
        method="POST",
        headers={"Content-Type": content_type, **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


@pytest.fixture(scope="module")
def reference(demo_server: ServerProcess, quick_model: dict[str, Path]) -> dict[str, Any]:
    """What classifier.v1 answers for the photos: the bar both OIP transports must meet."""
    images = photos(quick_model)
    with demo_server.client() as client:
        located = client.localize(images, model="demo", top_k=10)
    return {"images": images, "localized": located}


def probabilities_of(localized: list[Any]) -> np.ndarray:
    out = np.zeros((len(localized), 10), np.float32)
    for i, result in enumerate(localized):
        for p in result.predictions:
            out[i, p.index] = p.score
    return out


def test_grpc_health_metadata_and_config(demo_server: ServerProcess) -> None:
    client = tgrpc.InferenceServerClient(demo_server.target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("demo") and not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server.name == "imgclf" and "classification" in server.extensions
    metadata = client.get_model_metadata("demo")
    assert metadata.platform == "onnxruntime_onnx" and list(metadata.versions) == ["1"]
    inputs = {i.name: (i.datatype, list(i.shape)) for i in metadata.inputs}
    assert inputs == {"image_bytes": ("BYTES", [-1]), "image": ("UINT8", [-1, 64, 64, 3])}
    outputs = {o.name: (o.datatype, list(o.shape)) for o in metadata.outputs}
    assert outputs["probabilities"] == ("FP32", [-1, 10])
    assert outputs["boxes"] == ("FP32", [-1, 4]) and outputs["box_scores"] == ("FP32", [-1])
    assert outputs["cam"][0] == "FP32" and outputs["cam_classes"][0] == "INT64"
    config = client.get_model_config("demo").config
    assert config.max_batch_size == 32 and config.dynamic_batching is not None
    assert [i.name for i in config.input] == ["image_bytes", "image"]
    assert all(i.optional for i in config.input)


def test_grpc_infer_with_bytes_equals_classify_and_localize(
    demo_server: ServerProcess, reference: dict[str, Any]
) -> None:
    client = tgrpc.InferenceServerClient(demo_server.target)
    result = client.infer("demo", [bytes_input(tgrpc, reference["images"])])
    expected = probabilities_of(reference["localized"])
    assert np.allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
    boxes = np.array([r.box.as_tuple() for r in reference["localized"]], np.float32)
    assert np.allclose(result.as_numpy("boxes"), boxes, atol=1e-3)  # original-image pixels
    assert result.as_numpy("cam") is None  # CAMs only when asked for
    response = result.get_response()
    assert (response.model_name, response.model_version) == ("demo", "1")


def test_grpc_uint8_tensors_skip_the_resize_and_agree(
    demo_server: ServerProcess, reference: dict[str, Any], quick_model: dict[str, Path]
) -> None:
    spec = ModelSpec.from_metadata(read_metadata(quick_model["model"]))
    batch = np.stack([preprocess_encoded(i, spec, ImageLimits())[0] for i in reference["images"]])
    tensor = tgrpc.InferInput("image", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    client = tgrpc.InferenceServerClient(demo_server.target)
    result = client.infer(
        "demo",
        [tensor],
        outputs=[tgrpc.InferRequestedOutput(n) for n in ("probabilities", "boxes", "cam")],
    )
    expected = probabilities_of(reference["localized"])
    assert np.allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
    boxes = result.as_numpy("boxes")
    assert boxes.min() >= 0 and boxes.max() <= 64  # pixels of the 64 x 64 input itself
    assert result.as_numpy("cam").shape[0] == len(batch)


def test_classification_extension_gives_the_same_top_k(
    demo_server: ServerProcess, reference: dict[str, Any]
) -> None:
    client = tgrpc.InferenceServerClient(demo_server.target)
    output = tgrpc.InferRequestedOutput("probabilities", class_count=3)
    result = client.infer("demo", [bytes_input(tgrpc, reference["images"])], outputs=[output])
    classes = result.as_numpy("probabilities")
    assert classes.shape == (len(reference["images"]), 3)
    for row, located in zip(classes, reference["localized"], strict=True):
        parsed = [entry.decode().split(":") for entry in row]
        assert [int(index) for _, index, _ in parsed] == [p.index for p in located.predictions[:3]]
        assert [label for _, _, label in parsed] == [p.label for p in located.predictions[:3]]
        assert float(parsed[0][0]) == pytest.approx(located.predictions[0].score, abs=1e-5)


def test_typed_contents_are_accepted_and_answered_in_kind(
    demo_server: ServerProcess, reference: dict[str, Any]
) -> None:
    request = service_pb2.ModelInferRequest(model_name="demo", id="typed-1")
    tensor = request.inputs.add(name="image_bytes", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend(reference["images"][:2])
    with grpc.insecure_channel(demo_server.target) as channel:
        stub = tgrpc.service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=30)
    assert response.id == "typed-1" and not response.raw_output_contents
    probabilities = next(o for o in response.outputs if o.name == "probabilities")
    values = np.array(probabilities.contents.fp32_contents, np.float32).reshape(2, 10)
    assert np.allclose(values, probabilities_of(reference["localized"][:2]), atol=1e-6)


def test_errors_map_to_the_same_codes_and_messages_as_classifier_v1(
    demo_server: ServerProcess, reference: dict[str, Any]
) -> None:
    client = tgrpc.InferenceServerClient(demo_server.target)
    cases = {
        "bad image": ("demo", bytes_input(tgrpc, [b"not an image"]), "INVALID_ARGUMENT"),
        "unknown model": ("nope", bytes_input(tgrpc, reference["images"][:1]), "NOT_FOUND"),
        "too many": (
            "demo",
            bytes_input(tgrpc, reference["images"][:1] * 65),
            "RESOURCE_EXHAUSTED",
        ),
    }
    messages = {}
    for name, (model, tensor, code) in cases.items():
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, [tensor])
        assert info.value.status() == f"StatusCode.{code}", name
        messages[name] = info.value.message()
    assert "image 0: not a decodable image" in messages["bad image"]
    assert "over the limit of 64 (max_images_per_request)" in messages["too many"]
    wrong = tgrpc.InferInput("image", [1, 32, 32, 3], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(InferenceServerException, match=r"must be UINT8 \[N, 64, 64, 3\]"):
        client.infer("demo", [wrong])
    with pytest.raises(InferenceServerException, match="unknown output 'logits'"):
        client.infer(
            "demo",
            [bytes_input(tgrpc, reference["images"][:1])],
            outputs=[tgrpc.InferRequestedOutput("logits")],
        )


def test_http_health_metadata_and_infer_with_binary_data(
    demo_server: ServerProcess, reference: dict[str, Any]
) -> None:
    assert http_get(demo_server, "/v2/health/live") == (200, {"live": True})
    assert http_get(demo_server, "/v2/health/ready") == (200, {"ready": True})
    assert http_get(demo_server, "/v2/models/demo/ready") == (200, {"name": "demo", "ready": True})
    client = thttp.InferenceServerClient(demo_server.http_target)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("demo")
    metadata = client.get_model_metadata("demo")
    assert [i["name"] for i in metadata["inputs"]] == ["image_bytes", "image"]
    assert client.get_model_config("demo")["input"][1]["dims"] == [64, 64, 3]
    result = client.infer("demo", [bytes_input(thttp, reference["images"])])  # binary
    expected = probabilities_of(reference["localized"])
    assert np.allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
    classes = client.infer(
        "demo",
        [bytes_input(thttp, reference["images"][:2])],
        outputs=[thttp.InferRequestedOutput("probabilities", binary_data=False, class_count=2)],
    ).as_numpy("probabilities")
    first = reference["localized"][0].predictions[0]
    assert str(classes[0][0]).split(":")[1:] == [str(first.index), first.label]  # JSON: str
    with pytest.raises(InferenceServerException) as info:
        client.infer("demo", [bytes_input(thttp, [b"junk"])])
    assert info.value.status() == "400" and "not a decodable image" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("nope", [bytes_input(thttp, reference["images"][:1])])
    assert info.value.status() == "404"


def test_http_json_tensors_and_the_upload_routes(
    demo_server: ServerProcess, reference: dict[str, Any], quick_model: dict[str, Path]
) -> None:
    import base64

    image = reference["images"][0]
    body = {
        "inputs": [
            {
                "name": "image_bytes",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(image).decode()],
            }
        ],
        "outputs": [{"name": "probabilities"}, {"name": "boxes"}],
    }
    status, answer, _ = http_post(
        demo_server, "/v2/models/demo/infer", json.dumps(body).encode(), "application/json"
    )
    assert status == 200
    outputs = {o["name"]: o for o in answer["outputs"]}
    expected = probabilities_of(reference["localized"][:1])[0]
    assert np.allclose(outputs["probabilities"]["data"], expected, atol=1e-6)

    status, classified, headers = http_post(
        demo_server, "/v1/models/demo:classify?top_k=3", image, "image/jpeg"
    )
    assert status == 200 and headers["x-request-id"]
    top = classified["results"][0]["predictions"]
    assert [p["label"] for p in top] == [p.label for p in reference["localized"][0].predictions[:3]]
    boundary = "xyzzy"
    multipart = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, located, _ = http_post(
        demo_server,
        "/v1/models/demo:localize?heatmap=true",
        multipart,
        f"multipart/form-data; boundary={boundary}",
    )
    assert status == 200
    result = located["results"][0]
    box = reference["localized"][0].box
    assert result["box"]["x_min"] == pytest.approx(box.x_min, abs=1e-3)
    assert result["box_source"] == "regression"
    assert len(result["heatmap"]["values"]) == result["heatmap"]["height"]
    status, error, headers = http_post(demo_server, "/v1/models/demo:classify", b"?", "image/png")
    assert status == 400 and "not a decodable image" in error["error"]
    assert headers["classifier-error-reason"] == "invalid_image"
    status, models = http_get(demo_server, "/v1/models")
    assert status == 200 and models["models"][0]["name"] == "demo"
    status, docs = http_get(demo_server, "/openapi.json")
    assert status == 200 and "/v2/models/{model}/infer" in docs["paths"]


def test_one_pipeline_behind_both_front_doors(
    demo_server: ServerProcess, reference: dict[str, Any]
) -> None:
    def count(method: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in demo_server.series()
            if line.startswith("classifier_requests_total") and f'method="{method}"' in line
        )

    before = {m: count(m) for m in ("ModelInfer", "http:ModelInfer")}
    images_before = sum(
        float(line.rsplit(" ", 1)[1])
        for line in demo_server.series()
        if line.startswith("classifier_images_total")
    )
    tgrpc.InferenceServerClient(demo_server.target).infer(
        "demo", [bytes_input(tgrpc, reference["images"][:2])]
    )
    thttp.InferenceServerClient(demo_server.http_target).infer(
        "demo", [bytes_input(thttp, reference["images"][:3])]
    )
    assert count("ModelInfer") == before["ModelInfer"] + 1
    assert count("http:ModelInfer") == before["http:ModelInfer"] + 1
    images_after = sum(
        float(line.rsplit(" ", 1)[1])
        for line in demo_server.series()
        if line.startswith("classifier_images_total")
    )
    assert images_after == images_before + 5  # the same images_total as classifier.v1


def test_repository_extension_unloads_and_loads_with_the_swap_rules(
    start_server: type[ServerProcess], quick_model: dict[str, Path], tmp_path: Path
) -> None:
    copy_model(quick_model["model"], tmp_path, "demo", 1)
    server = start_server(tmp_path, "--auth-token", "ops")
    server.wait_for_event("serving")
    headers = {"authorization": "Bearer ops"}
    client = tgrpc.InferenceServerClient(server.target)
    with pytest.raises(InferenceServerException) as info:
        client.get_model_repository_index()  # behind the token
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    assert client.is_server_ready()  # health needs none
    index = client.get_model_repository_index(headers=headers)
    assert [(m.name, m.version, m.state) for m in index.models] == [("demo", "1", "READY")]
    client.unload_model("demo", headers=headers)
    deadline = time.monotonic() + 10
    while client.is_model_ready("demo", headers=headers):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    copy_model(quick_model["model"], tmp_path, "demo", 2)  # no polling: loaded on request
    client.load_model("demo", headers=headers)
    assert client.is_model_ready("demo", "2", headers=headers)
    assert not client.is_model_ready("demo", "1", headers=headers)  # latest: 2 replaced 1
    with pytest.raises(InferenceServerException, match=r"no nope/<version>/model\.onnx"):
        client.load_model("nope", headers=headers)
    http = thttp.InferenceServerClient(server.http_target)
    with pytest.raises(InferenceServerException) as info:
        http.get_model_repository_index()
    assert info.value.status() == "401"
    assert [m["state"] for m in http.get_model_repository_index(headers=headers)] == ["READY"]


def test_http_drain_reports_not_ready_while_still_serving(
    start_server: type[ServerProcess], quick_model: dict[str, Path]
) -> None:
    server = start_server(quick_model["repository"], "--drain-seconds", "2")
    server.wait_for_event("serving")
    image = photos(quick_model, 1)[0]
    server.process.send_signal(15)
    deadline = time.monotonic() + 1.5
    while http_get(server, "/v2/health/ready")[0] != 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert http_get(server, "/v2/health/ready") == (503, {"ready": False})
    assert http_get(server, "/v2/health/live") == (200, {"live": True})
    status, answer, _ = http_post(server, "/v1/models/demo:classify", image, "image/jpeg")
    assert status == 200 and answer["results"]
    assert server.process.wait(30) == 0


def test_http_refuses_bodies_over_the_message_limit(
    start_server: type[ServerProcess], quick_model: dict[str, Path]
) -> None:
    server = start_server(
        quick_model["repository"],
        "--max-receive-message-bytes",
        "100000",
        "--max-image-bytes",
        "50000",
        "--max-inflight-bytes",
        "100000",
    )
    server.wait_for_event("serving")
    status, error, _ = http_post(server, "/v1/models/demo:classify", b"x" * 200_000, "image/png")
    assert status == 413 and "(max_receive_message_bytes)" in error["error"]
    assert http_get(server, "/v2/health/ready")[0] == 200  # and the server carries on
