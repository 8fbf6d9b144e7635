"""The data plane, in this process on a tiny real model (no server, no port): what every
front door gets from it — answers from the version it leased, the default top-k, default
outputs, metadata, config, readiness, repository control — and the errors it raises."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.model.errors import (
    InvalidArgumentError,
    LimitExceededError,
    NotFoundError,
    UnavailableError,
)
from service.server.calls import CallInfo
from service.server.domain import ImageRequest, TensorRequest
from service.server.tensors import BYTES_INPUT, InputTensor, OutputRequest, pack_bytes
from tests.unit.service.server.planes import (
    MODEL,
    Plane,
    jpeg,
    pixels,
    run_scenario,
)


def test_classify_answers_from_the_newest_version_with_the_default_top_k(
    two_versions: Path,
) -> None:
    async def scenario(p: Plane) -> None:
        call = CallInfo("")
        request = ImageRequest(MODEL, "", [jpeg((200, 30, 30)), pixels((10, 10, 240))])
        answer = await p.plane.classify(call, request)
        assert (answer.model, answer.version) == (MODEL, "2")
        assert (call.model, call.version, call.images) == (MODEL, "2", 2)
        assert [len(r) for r in answer.results] == [min(p.settings.default_top_k, 4)] * 2
        # different pixels, different answers: each image got its own row
        assert answer.results[0][0].score != answer.results[1][0].score
        one = await p.plane.classify(call, ImageRequest(MODEL, "1", [jpeg((1, 2, 3))], top_k=1))
        assert one.version == "1" and len(one.results[0]) == 1

    run_scenario(two_versions, scenario, version_policy="all")


def test_errors_name_the_problem(two_versions: Path) -> None:
    async def scenario(p: Plane) -> None:
        call = CallInfo("")
        with pytest.raises(NotFoundError):
            await p.plane.classify(call, ImageRequest("nope", "", [jpeg((1, 1, 1))]))
        with pytest.raises(InvalidArgumentError, match="no images"):
            await p.plane.classify(call, ImageRequest(MODEL, "", []))
        too_many = [jpeg((1, 1, 1))] * 3
        with pytest.raises(LimitExceededError, match="max_images_per_request"):
            await p.plane.classify(call, ImageRequest(MODEL, "", too_many))
        with pytest.raises(InvalidArgumentError):  # a classifier cannot localize
            await p.plane.localize(call, ImageRequest(MODEL, "", [jpeg((1, 1, 1))]), False)

    run_scenario(two_versions, scenario, max_images_per_request=2)


def test_tensor_inference_gets_the_default_outputs_or_those_asked_for(two_versions: Path) -> None:
    async def scenario(p: Plane) -> None:
        images = [jpeg((250, 250, 10)), jpeg((5, 5, 5))]
        inputs = [InputTensor(BYTES_INPUT, "BYTES", [2], raw=pack_bytes(images))]
        answer = await p.plane.infer(CallInfo(""), TensorRequest(MODEL, "1", inputs))
        assert answer.version == "1"
        by_name = {t.name: t for t in answer.results}
        assert "probabilities" in by_name and by_name["probabilities"].shape == [2, 4]
        assert np.allclose(np.asarray(by_name["probabilities"].array).sum(axis=1), 1, atol=1e-5)
        asked = [OutputRequest("probabilities", 0, {})]
        only = await p.plane.infer(CallInfo(""), TensorRequest(MODEL, "1", inputs, asked))
        assert [t.name for t in only.results] == ["probabilities"]
        with pytest.raises(InvalidArgumentError, match="nope"):
            bad = [OutputRequest("nope", 0, {})]
            await p.plane.infer(CallInfo(""), TensorRequest(MODEL, "1", inputs, bad))

    run_scenario(two_versions, scenario, version_policy="all")


def test_metadata_config_and_readiness(two_versions: Path) -> None:
    async def scenario(p: Plane) -> None:
        call = CallInfo("")
        meta = p.plane.model_metadata(call, MODEL, "")
        assert meta.versions == ["1", "2"] and meta.platform == "onnxruntime_onnx"
        assert [i.name for i in meta.inputs] and [o.name for o in meta.outputs]
        config = p.plane.model_config(call, MODEL, "1")
        assert config.max_batch_size == p.settings.max_batch_size and not config.on_gpu
        assert p.plane.model_ready(call, MODEL, "2") and not p.plane.model_ready(call, MODEL, "9")
        assert p.plane.server_ready()
        assert {(m.name, m.version, m.state.value) for m in p.plane.models()} == {
            (MODEL, "1", "ready"),
            (MODEL, "2", "ready"),
        }
        assert p.plane.model_summary(call, MODEL, "").spec is not None

    run_scenario(two_versions, scenario, version_policy="all")


def test_repository_control_unloads_and_loads_and_refuses_a_model_that_cannot_load(
    two_versions: Path,
) -> None:
    broken = two_versions / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"not a model")

    async def scenario(p: Plane) -> None:
        call = CallInfo("")
        await p.plane.unload(call, MODEL)
        await asyncio.sleep(0.05)  # unloading finishes once its leases are released
        assert not [e for e in p.plane.index(ready_only=True) if e.name == MODEL]
        with pytest.raises(UnavailableError):
            await p.plane.classify(call, ImageRequest(MODEL, "", [jpeg((1, 1, 1))]))
        await p.plane.load(call, MODEL)
        assert {e.version for e in p.plane.index(ready_only=True) if e.name == MODEL} == {"2"}
        with pytest.raises(UnavailableError, match="did not load"):
            await p.plane.load(call, "broken")
        states = {(e.name, e.state) for e in p.plane.index()}
        assert ("broken", "UNAVAILABLE") in states
        with pytest.raises(NotFoundError):
            await p.plane.load(call, "absent")

    run_scenario(two_versions, scenario)
