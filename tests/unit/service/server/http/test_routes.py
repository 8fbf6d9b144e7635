"""The HTTP adapter (every router: health and metadata, infer, repository, upload) through
FastAPI's TestClient, on a real in-process data plane: status codes, JSON bodies, the
binary-data extension, request ids, and the token check. No server, no port."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import anyio.from_thread
import pytest
from fastapi.testclient import TestClient

from service.model.errors import REASON_KEY, REQUEST_ID_KEY
from service.server.http.app import create_app
from service.server.tensors import BYTES_INPUT, pack_bytes
from tests.unit.service.server.planes import MODEL, Plane, build_plane, jpeg, publish

TOKEN = "sesame"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Plane]]:
    root = tmp_path_factory.mktemp("repository")
    publish(root, 1)
    # The data plane and the requests share one event loop: the client's portal is ours.
    with anyio.from_thread.start_blocking_portal() as portal:
        plane = portal.call(build_plane, root, TOKEN)
        client = TestClient(create_app(plane.settings, plane.plane, plane.envelope))
        client.portal = portal
        client.headers["authorization"] = f"Bearer {TOKEN}"
        yield client, plane
        portal.call(plane.close)


def test_health_needs_no_token_and_metadata_does(served: tuple[TestClient, Plane]) -> None:
    client, plane = served
    assert client.get("/v2/health/live", headers={"authorization": ""}).json() == {"live": True}
    assert client.get("/v2/health/ready", headers={"authorization": ""}).json() == {"ready": True}
    refused = client.get("/v2", headers={"authorization": "Bearer wrong", REQUEST_ID_KEY: "x1"})
    assert refused.status_code == 401 and refused.headers[REASON_KEY] == "unauthenticated"
    assert refused.headers[REQUEST_ID_KEY] == "x1" and "x1" in refused.json()["error"]
    assert plane.count("http:ServerMetadata", "UNAUTHENTICATED") == 1
    meta = client.get("/v2").json()
    assert "binary_tensor_data" in meta["extensions"] and "classification" in meta["extensions"]


def test_model_metadata_ready_and_config(served: tuple[TestClient, Plane]) -> None:
    client, _ = served
    meta = client.get(f"/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert client.get(f"/v2/models/{MODEL}/versions/1/ready").json()["ready"] is True
    assert client.get(f"/v2/models/{MODEL}/versions/7/ready").status_code == 503
    config = client.get(f"/v2/models/{MODEL}/config").json()
    assert isinstance(config["max_batch_size"], int)  # int64 fields as numbers
    missing = client.get("/v2/models/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


def test_infer_with_json_tensors_and_with_binary_data(served: tuple[TestClient, Plane]) -> None:
    client, _ = served
    image = jpeg((200, 100, 0))
    body = {
        "id": "q1",
        "inputs": [
            {
                "name": BYTES_INPUT,
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(image).decode()],
            }
        ],
    }
    answer = client.post(f"/v2/models/{MODEL}/infer", json=body).json()
    assert answer["id"] == "q1" and answer["model_version"] == "1"
    probabilities = next(o for o in answer["outputs"] if o["name"] == "probabilities")
    assert probabilities["shape"] == [1, 4] and abs(sum(probabilities["data"]) - 1) < 1e-5

    raw = pack_bytes([image])
    header = {
        "inputs": [
            {
                "name": BYTES_INPUT,
                "datatype": "BYTES",
                "shape": [1],
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    encoded = json.dumps(header).encode()
    response = client.post(
        f"/v2/models/{MODEL}/infer",
        content=encoded + raw,
        headers={"Inference-Header-Content-Length": str(len(encoded))},
    )
    assert response.status_code == 200
    size = int(response.headers["inference-header-content-length"])
    described = json.loads(response.content[:size])
    sizes = [o["parameters"]["binary_data_size"] for o in described["outputs"]]
    assert sum(sizes) == len(response.content) - size  # every output as binary data

    bad = client.post(f"/v2/models/{MODEL}/infer", content=b"{not json")
    assert bad.status_code == 400 and bad.headers[REASON_KEY]


def test_upload_routes_classify_list_and_refuse_bad_input(served: tuple[TestClient, Plane]) -> None:
    client, _ = served
    answer = client.post(
        f"/v1/models/{MODEL}:classify?top_k=2",
        content=jpeg((0, 0, 255)),
        headers={"content-type": "image/jpeg"},
    ).json()
    assert answer["version"] == "1" and len(answer["results"][0]["predictions"]) == 2
    files = [("file", ("a.jpg", jpeg((1, 2, 3)), "image/jpeg"))] * 2
    form = client.post(f"/v1/models/{MODEL}:classify", files=files).json()
    assert len(form["results"]) == 2
    assert client.get("/v1/models").json()["models"][0]["labels"] == ["0", "1", "2", "3"]
    assert client.post(f"/v1/models/{MODEL}:classify", content=b"").status_code == 400
    assert client.post(f"/v1/models/{MODEL}:classify?top_k=x", content=b"1").status_code == 400
    assert client.post(f"/v1/models/{MODEL}:localize", content=jpeg((1, 1, 1))).status_code == 400


def test_repository_index_unload_and_load(served: tuple[TestClient, Plane]) -> None:
    client, _ = served
    assert client.post("/v2/repository/index", json={"ready": True}).json() == [
        {"name": MODEL, "version": "1", "state": "READY", "reason": ""}
    ]
    assert client.post(f"/v2/repository/models/{MODEL}/unload").status_code == 200
    assert client.post(f"/v2/repository/models/{MODEL}/load").status_code == 200
    assert client.post("/v2/repository/models/absent/load").status_code == 404
    assert client.get(f"/v2/models/{MODEL}/ready").status_code == 200


def test_statistics_and_traffic_routes(served: tuple[TestClient, Plane]) -> None:
    client, _ = served
    body = pack_bytes([jpeg((1, 2, 3))])
    infer = {
        "inputs": [
            {
                "name": BYTES_INPUT,
                "datatype": "BYTES",
                "shape": [1],
                "parameters": {"binary_data_size": len(body)},
            }
        ]
    }
    header = json.dumps(infer).encode()
    response = client.post(
        f"/v2/models/{MODEL}/infer",
        content=header + body,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    for path in (
        "/v2/models/stats",
        f"/v2/models/{MODEL}/stats",
        f"/v2/models/{MODEL}/versions/1/stats",
    ):
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.text)
        (stats,) = answer.json()["model_stats"]
        assert (stats["name"], stats["version"]) == (MODEL, "1")
        assert stats["inference_stats"]["success"]["count"] >= 1
        assert set(stats["inference_stats"]["queue"]) == {"count", "ns"}
        assert stats["batch_stats"][0]["compute_infer"]["ns"] > 0
    assert client.get("/v2/models/absent/stats").status_code == 404
    assert "statistics" in client.get("/v2").json()["extensions"]

    shown = client.get(f"/v2/repository/models/{MODEL}/traffic").json()
    assert shown == {
        "model": MODEL,
        "weights": {},
        "source": "none: the newest ready version",
        "ready_versions": ["1"],
    }
    put = client.put(f"/v2/repository/models/{MODEL}/traffic", json={"weights": {"1": 5}})
    assert put.status_code == 200 and put.json()["weights"] == {"1": 5.0}
    assert put.json()["source"].endswith("traffic.json")
    bad = client.put(f"/v2/repository/models/{MODEL}/traffic", json={"weights": {"x": 1}})
    assert bad.status_code == 400 and "not a number" in bad.json()["error"]
    assert client.put(f"/v2/repository/models/{MODEL}/traffic", content=b"[").status_code == 400
    cleared = client.delete(f"/v2/repository/models/{MODEL}/traffic").json()
    assert cleared["weights"] == {} and cleared["source"].startswith("none")
