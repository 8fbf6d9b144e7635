"""The GPU decode path with its stand-in decoder (Pillow into host memory) and ONNX
Runtime's CPU provider in the device's place: the same header checks, fallbacks, budget,
resize graph, rows and batch assembly that run on a GPU. The real decoder runs in
tests/integration/service/model/test_gpu_decode.py on a GPU."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.model.cuda import gpu_present
from service.model.decode_budget import DecodeBudget
from service.model.errors import InvalidImageError, LimitExceededError
from service.model.gpu_decode import DevicePreprocessor, DeviceRow, device_preprocessor_for
from service.model.image_decoders import PillowHostDecoder
from service.model.image_header import ImageLimits
from service.model.preprocess import preprocess_encoded
from service.model.runner import Runner
from service.model.runner_options import CPU, RunnerOptions
from service.model.spec import ResizeMode
from tests.unit.service.model.gpu_decode_models import spec_for, write_tiny_model

LIMITS = ImageLimits()


def photo(width: int, height: int, seed: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.float32)
    pixels += rng.normal(0, 10, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(params=list(ResizeMode))
def runner(request: pytest.FixtureRequest, tmp_path: Path) -> Runner:
    spec = spec_for(request.param)
    return Runner(write_tiny_model(tmp_path / "m.onnx", spec), RunnerOptions(providers=[CPU]))


def test_rows_match_the_cpu_path_and_batches_mix_rows_and_host_images(runner: Runner) -> None:
    device = DevicePreprocessor(runner.spec, PillowHostDecoder(), runner.device_resize())
    datas = [photo(320, 240, 0), photo(200, 300, 1), photo(640, 480, 2), photo(96, 96, 3)]
    outcomes = device.prepare(datas, LIMITS)
    rows = []
    for data, outcome in zip(datas, outcomes, strict=True):
        assert isinstance(outcome, tuple)
        row, geometry = outcome
        want, want_geometry = preprocess_encoded(data, runner.spec, LIMITS)
        assert geometry == want_geometry
        # Pillow rounds between its two 8-bit passes; the graph resizes in float.
        difference = np.abs(device.read_row(row).astype(int) - want)
        assert difference.mean() < 0.5 and (difference > 2).mean() < 0.002
        rows.append((row, want))
    # Device rows and host images in one batch, in order, as the batcher hands them over.
    items: list[np.ndarray | DeviceRow] = [rows[0][0], rows[1][1], rows[2][0], rows[3][1]]
    got = runner.run_items(items)["probabilities"]
    want = runner.run(np.stack([r[1] for r in rows]))["probabilities"]
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_what_the_gpu_path_cannot_take_goes_to_the_cpu_and_bad_images_fail_alone(
    runner: Runner,
) -> None:
    device = DevicePreprocessor(runner.spec, PillowHostDecoder(), runner.device_resize())
    tight = ImageLimits(max_pixels=100_000)
    datas = [
        photo(100, 80, 0, "PNG"),  # not a JPEG: the CPU path
        photo(100, 80, 1, "JPEG", "CMYK"),  # CMYK: the CPU path converts it its own way
        b"not an image",
        photo(400, 400, 2),  # 160,000 pixels: over max_image_pixels
        photo(100, 80, 3),
    ]
    outcomes = device.prepare(datas, tight, indices=[4, 5, 6, 7, 8])
    assert outcomes[0] is None and outcomes[1] is None
    assert isinstance(outcomes[2], InvalidImageError) and "image 6" in outcomes[2].message
    assert isinstance(outcomes[3], LimitExceededError)
    assert "max_image_pixels" in outcomes[3].message and "image 7" in outcomes[3].message
    assert isinstance(outcomes[4], tuple)
    assert device.fallbacks == 2


def test_an_image_the_decoder_gives_up_on_falls_back_and_the_budget_is_given_back(
    runner: Runner,
) -> None:
    class Refusing(PillowHostDecoder):
        def decode(self, datas):  # type: ignore[no-untyped-def]
            return [None for _ in datas]

    budget = DecodeBudget(2_000_000)
    device = DevicePreprocessor(runner.spec, Refusing(), runner.device_resize())
    assert device.prepare([photo(320, 240, 0)], LIMITS, budget) == [None]
    good = DevicePreprocessor(runner.spec, PillowHostDecoder(), runner.device_resize())
    # More pixels than the budget holds at once: decoded in turns, every one done.
    datas = [photo(1000, 800, i) for i in range(4)]  # 800,000 pixels each
    outcomes = good.prepare(datas, LIMITS, budget)
    assert all(isinstance(o, tuple) for o in outcomes)
    assert budget.in_use == 0


def test_rows_of_one_request_share_one_buffer(runner: Runner) -> None:
    device = DevicePreprocessor(runner.spec, PillowHostDecoder(), runner.device_resize())
    outcomes = device.prepare([photo(120, 90, 0), photo(90, 120, 1)], LIMITS)
    rows = [o[0] for o in outcomes if isinstance(o, tuple)]
    assert all(isinstance(r, DeviceRow) for r in rows)
    assert rows[0].rows is rows[1].rows and [r.index for r in rows] == [0, 1]
    row_bytes = runner.spec.input.height * runner.spec.input.width * 3
    assert rows[1].pointer - rows[0].pointer == row_bytes


def test_the_self_check_measures_the_difference_from_the_cpu_path(runner: Runner) -> None:
    device = DevicePreprocessor(runner.spec, PillowHostDecoder(), runner.device_resize())
    assert device.self_check(LIMITS) < 1.0

    class Shifted(PillowHostDecoder):  # a decoder with a colour bug
        def decode(self, datas):  # type: ignore[no-untyped-def]
            views = super().decode(datas)
            for view in views:
                if view is not None:
                    view.owner[...] = 255 - view.owner  # type: ignore[attr-defined]
            return views

    broken = DevicePreprocessor(runner.spec, Shifted(), runner.device_resize())
    with pytest.raises(ValueError, match="differ from the CPU path"):
        broken.self_check(LIMITS)


def test_the_setting_chooses_and_gpu_without_a_gpu_is_refused(runner: Runner) -> None:
    assert device_preprocessor_for(runner, "cpu", LIMITS) is None
    assert device_preprocessor_for(runner, "auto", LIMITS) is None  # the model is on the CPU
    with pytest.raises(ValueError, match="needs a GPU provider"):
        device_preprocessor_for(runner, "gpu", LIMITS)


def test_gpu_presence_comes_from_device_nodes_and_cuda_visible_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert not gpu_present(tmp_path)
    (tmp_path / "nvidiactl").touch()
    assert not gpu_present(tmp_path)  # the control node alone is not a GPU
    (tmp_path / "nvidia0").touch()
    assert gpu_present(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not gpu_present(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert gpu_present(tmp_path)


def test_the_request_pipeline_sends_encoded_images_to_the_device_and_keeps_order(
    runner: Runner,
) -> None:
    # classifier.v1's pipeline with GPU decoding on the runner: JPEGs (bytes or Image
    # messages) through the device path in one task, a PNG and a model-sized array through
    # the CPU path, answers in request order; a bad image fails the request naming it.
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from service.model.errors import InvalidArgumentError
    from service.proto_gen.classifier.v1 import classifier_pb2 as pb
    from service.server.batching import BatcherConfig, DynamicBatcher
    from service.server.calls import CallInfo
    from service.server.config_loading import load_settings
    from service.server.metrics import Metrics
    from service.server.online import RequestPipeline
    from service.server.versions import ModelVersion

    runner.device_preprocessor = DevicePreprocessor(
        runner.spec, PillowHostDecoder(), runner.device_resize()
    )
    size = runner.spec.input.height
    array = np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)
    images = [
        photo(320, 240, 0),
        pb.Image(encoded=photo(200, 300, 1)),
        photo(100, 80, 2, "PNG"),
        array,
        photo(640, 480, 3),
    ]
    want = runner.run(
        np.stack(
            [
                preprocess_encoded(photo(320, 240, 0), runner.spec, LIMITS)[0],
                preprocess_encoded(photo(200, 300, 1), runner.spec, LIMITS)[0],
                preprocess_encoded(photo(100, 80, 2, "PNG"), runner.spec, LIMITS)[0],
                array,
                preprocess_encoded(photo(640, 480, 3), runner.spec, LIMITS)[0],
            ]
        )
    )["probabilities"]

    async def main() -> None:
        with ThreadPoolExecutor(4) as pool:
            pipeline = RequestPipeline(load_settings(), Metrics(), pool)
            entry = ModelVersion("tiny", 1, Path("m.onnx"), runner=runner)
            entry.batcher = DynamicBatcher("tiny/1", runner.run_items, BatcherConfig(), pool)
            entry.batcher.start()
            rows, geometries = await pipeline.run(entry, images, None, CallInfo("tiny"), 0)
            got = np.stack([row["probabilities"] for row in rows])
            np.testing.assert_allclose(got, want, atol=2e-3)
            assert (geometries[0].original_width, geometries[3].original_width) == (320, size)
            with pytest.raises(InvalidArgumentError, match="image 1"):
                await pipeline.run(entry, [images[0], b"junk"], None, CallInfo("tiny"), 0)
            await entry.batcher.close()

    asyncio.run(main())
    assert runner.device_preprocessor.fallbacks == 1  # the PNG
