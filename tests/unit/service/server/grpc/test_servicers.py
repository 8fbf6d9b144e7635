"""The gRPC adapters (classifier.v1 and the Open Inference Protocol) called as grpc.aio
would call them, with a fake servicer context, on a real in-process data plane: protobuf
in and out, status codes, trailers and request ids from the envelope. No server, no port."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as oip

from service.model.errors import REASON_KEY, REQUEST_ID_KEY
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.server.grpc.classifier import ImageClassifierServicer
from service.server.grpc.envelope import GrpcEnvelope
from service.server.grpc.oip import InferenceServicer
from service.server.metrics import UNKNOWN_MODEL
from service.server.tensors import BYTES_INPUT, pack_bytes
from tests.unit.service.server.planes import MODEL, Plane, build_plane, jpeg, publish


class FakeContext:
    """What our servicers use of ``grpc.aio.ServicerContext``."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = (), remaining: float = 10.0):
        self.metadata, self.remaining = metadata, remaining
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailers: dict[str, str] = {}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def time_remaining(self) -> float:
        return self.remaining

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailers: Any) -> None:
        self.trailers = dict(trailers)


Servicers = tuple[ImageClassifierServicer, InferenceServicer, Plane]


def run(tmp_path: Path, scenario: Callable[[Servicers], Awaitable[None]]) -> None:
    publish(tmp_path, 1)

    async def main() -> None:
        plane = await build_plane(tmp_path)
        envelope = GrpcEnvelope(plane.envelope)
        try:
            await scenario(
                (
                    ImageClassifierServicer(plane.plane, envelope),
                    InferenceServicer(plane.plane, envelope),
                    plane,
                )
            )
        finally:
            await plane.close()

    asyncio.run(main())


def test_classify_and_localize_answer_in_protobuf_with_the_request_id(tmp_path: Path) -> None:
    async def scenario(s: Servicers) -> None:
        classifier, _, plane = s
        context = FakeContext(((REQUEST_ID_KEY, "mine-1"),))
        request = pb.ClassifyRequest(
            model=MODEL, top_k=2, images=[pb.Image(encoded=jpeg((200, 10, 10)))]
        )
        response = await classifier.Classify(request, context)
        assert context.code is None and context.trailers == {REQUEST_ID_KEY: "mine-1"}
        assert (response.model, response.version) == (MODEL, "1")
        assert len(response.results) == 1 and len(response.results[0].predictions) == 2
        assert plane.count("Classify", "OK") == 1

        context = FakeContext()
        localize = pb.LocalizeRequest(model=MODEL, images=[pb.Image(encoded=jpeg((1, 1, 1)))])
        assert await classifier.Localize(localize, context) is None
        assert context.code is grpc.StatusCode.INVALID_ARGUMENT
        assert context.trailers[REASON_KEY] and "request id" in context.details
        assert plane.count("Localize", "INVALID_ARGUMENT") == 1

    run(tmp_path, scenario)


def test_an_unknown_model_is_not_found_and_labelled_unknown(tmp_path: Path) -> None:
    async def scenario(s: Servicers) -> None:
        classifier, _, plane = s
        context = FakeContext()
        request = pb.ClassifyRequest(model="nope", images=[pb.Image(encoded=jpeg((1, 1, 1)))])
        assert await classifier.Classify(request, context) is None
        assert context.code is grpc.StatusCode.NOT_FOUND and "nope" in context.details
        assert plane.count("Classify", "NOT_FOUND", model=UNKNOWN_MODEL) == 1
        info = await classifier.GetModel(pb.GetModelRequest(model=MODEL), FakeContext())
        assert info.name == MODEL and list(info.labels) == ["0", "1", "2", "3"]
        listed = await classifier.ListModels(pb.ListModelsRequest(), FakeContext())
        assert [(m.name, m.version, m.state) for m in listed.models] == [(MODEL, "1", "ready")]

    run(tmp_path, scenario)


def test_oip_infer_metadata_config_and_repository(tmp_path: Path) -> None:
    async def scenario(s: Servicers) -> None:
        _, inference, _ = s
        images = [jpeg((10, 200, 10)), jpeg((10, 10, 200))]
        request = oip.ModelInferRequest(model_name=MODEL, id="r7")
        request.inputs.add(name=BYTES_INPUT, datatype="BYTES", shape=[2])
        request.raw_input_contents.append(pack_bytes(images))
        response = await inference.ModelInfer(request, FakeContext())
        assert (response.model_name, response.model_version, response.id) == (MODEL, "1", "r7")
        assert "probabilities" in [o.name for o in response.outputs]
        assert len(response.raw_output_contents) == len(response.outputs)  # raw in, raw out

        meta = await inference.ModelMetadata(oip.ModelMetadataRequest(name=MODEL), FakeContext())
        assert meta.versions == ["1"] and meta.platform == "onnxruntime_onnx"
        config = await inference.ModelConfig(oip.ModelConfigRequest(name=MODEL), FakeContext())
        assert config.config.max_batch_size > 0
        ready = await inference.ModelReady(oip.ModelReadyRequest(name=MODEL), FakeContext())
        assert ready.ready
        index = await inference.RepositoryIndex(oip.RepositoryIndexRequest(), FakeContext())
        assert [(m.name, m.state) for m in index.models] == [(MODEL, "READY")]
        context = FakeContext()
        load = oip.RepositoryModelLoadRequest(model_name="absent")
        assert await inference.RepositoryModelLoad(load, context) is None
        assert context.code is grpc.StatusCode.NOT_FOUND

    run(tmp_path, scenario)


@pytest.mark.parametrize("remaining", [0.0, 5.0])
def test_a_cancelled_call_counts_as_deadline_exceeded_only_when_its_deadline_passed(
    tmp_path: Path, remaining: float
) -> None:
    async def scenario(s: Servicers) -> None:
        _, _, plane = s
        envelope = GrpcEnvelope(plane.envelope)

        async def hangs(call: Any) -> None:
            await asyncio.sleep(60)

        task = asyncio.ensure_future(envelope.run("Slow", FakeContext(remaining=remaining), hangs))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        code = "DEADLINE_EXCEEDED" if remaining == 0 else "CANCELLED"
        assert plane.count("Slow", code) == 1

    run(tmp_path, scenario)


def infer_request(request_id: str, images: list[bytes]) -> Any:
    request = oip.ModelInferRequest(model_name=MODEL, id=request_id)
    request.inputs.add(name=BYTES_INPUT, datatype="BYTES", shape=[len(images)])
    request.raw_input_contents.append(pack_bytes(images))
    return request


def test_a_stream_answers_each_request_on_its_own_with_its_id(tmp_path: Path) -> None:
    async def scenario(s: Servicers) -> None:
        _, inference, plane = s

        async def requests() -> Any:
            for i in range(6):
                images = [b"not an image"] if i == 3 else [jpeg((40 * i, 10, 10))]
                yield infer_request(f"s{i}", images)

        context = FakeContext()
        answers = [a async for a in inference.ModelStreamInfer(requests(), context)]
        assert context.code is None  # the stream itself succeeded
        by_id = {a.infer_response.id: a for a in answers}
        assert sorted(by_id) == [f"s{i}" for i in range(6)]
        failed = by_id.pop("s3")
        assert "image 0" in failed.error_message and "(request id s3)" in failed.error_message
        for answer in by_id.values():
            assert answer.error_message == ""
            assert answer.infer_response.model_version == "1"
            assert "probabilities" in [o.name for o in answer.infer_response.outputs]
        assert plane.count("ModelStreamInfer", "OK", MODEL) == 5
        assert plane.count("ModelStreamInfer", "INVALID_ARGUMENT", MODEL) == 1

    run(tmp_path, scenario)


def test_model_statistics_in_protobuf(tmp_path: Path) -> None:
    async def scenario(s: Servicers) -> None:
        _, inference, _ = s
        for i in range(3):
            await inference.ModelInfer(infer_request(f"r{i}", [jpeg((9, 9, 9))] * 2), FakeContext())
        request = oip.ModelStatisticsRequest(name=MODEL)
        response = await inference.ModelStatistics(request, FakeContext())
        (stats,) = response.model_stats
        assert (stats.name, stats.version) == (MODEL, "1")
        assert stats.inference_stats.success.count == 3 and stats.inference_count == 6
        assert stats.inference_stats.compute_infer.ns > 0
        assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == 6
        context = FakeContext()
        absent = oip.ModelStatisticsRequest(name="absent")
        assert await inference.ModelStatistics(absent, context) is None
        assert context.code is grpc.StatusCode.NOT_FOUND

    run(tmp_path, scenario)


def test_a_classifier_stream_answers_classify_and_localize_each_on_its_own(
    tmp_path: Path,
) -> None:
    async def scenario(s: Servicers) -> None:
        classifier, _, plane = s

        async def requests() -> Any:
            yield pb.StreamRequest(
                id="a",
                classify=pb.ClassifyRequest(
                    model=MODEL, images=[pb.Image(encoded=jpeg((9, 9, 9)))]
                ),
            )
            yield pb.StreamRequest(
                id="b",
                localize=pb.LocalizeRequest(
                    model=MODEL, images=[pb.Image(encoded=jpeg((1, 90, 9)))]
                ),
            )
            yield pb.StreamRequest(
                id="c", classify=pb.ClassifyRequest(model=MODEL, images=[pb.Image(encoded=b"junk")])
            )
            yield pb.StreamRequest(id="d")  # neither classify nor localize

        context = FakeContext()
        answers = {a.id: a async for a in classifier.Stream(requests(), context)}
        assert context.code is None
        assert sorted(answers) == ["a", "b", "c", "d"]
        assert answers["a"].classify.version == "1" and answers["a"].classify.results
        # The tiny model has neither a box head nor CAM outputs: its own error, alone.
        assert answers["b"].error.code == "INVALID_ARGUMENT", answers["b"]
        assert "localize" in answers["b"].error.message
        assert answers["c"].error.code == "INVALID_ARGUMENT"
        assert answers["c"].error.reason == "invalid_image"
        assert "(request id c)" in answers["c"].error.message
        assert answers["d"].error.code == "INVALID_ARGUMENT"
        assert plane.count("StreamClassify", "OK", MODEL) == 1
        assert plane.count("StreamLocalize", "INVALID_ARGUMENT", MODEL) == 1
        assert plane.count("StreamClassify", "INVALID_ARGUMENT", MODEL) == 1

    run(tmp_path, scenario)
