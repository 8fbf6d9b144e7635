"""GPU JPEG decoding on a real GPU: nvImageCodec into device memory, the device resize,
rows into batches, and the server's decode_device setting, against the CPU path.

Marked ``gpu``: skipped where this onnxruntime has no CUDA provider or nvImageCodec is not
installed (CI and the dev machine; there, tests/unit/service/model/test_gpu_decode.py runs the
same path with a host stand-in). Run on a GPU machine: ``python -m pytest -m gpu``.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service.model.cuda import gpu_present
from service.model.image_header import ImageLimits
from service.model.preprocess import preprocess_encoded
from service.model.runner import Runner
from service.model.runner_options import CPU, CUDA, RunnerOptions

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        CUDA not in ort.get_available_providers()
        or importlib.util.find_spec("nvidia.nvimgcodec") is None,
        reason="needs onnxruntime-gpu and nvImageCodec (requirements/gpu.txt)",
    ),
    pytest.mark.skipif(not gpu_present(), reason="no NVIDIA GPU on this machine"),
]

LIMITS = ImageLimits()


def val_images(quick_model: dict[str, Path], count: int) -> list[bytes]:
    files = sorted(quick_model["data"].glob("val/*/*.jpg"))[:count]
    return [f.read_bytes() for f in files]


def png(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def gpu_runner(quick_model: dict[str, Path]) -> Runner:
    from service.model.gpu_decode import device_preprocessor_for

    runner = Runner(quick_model["model"], RunnerOptions(providers=[CUDA, CPU]))
    if not runner.on_gpu:
        pytest.skip(f"the CUDA provider could not start here: running {runner.active_providers}")
    runner.device_preprocessor = device_preprocessor_for(runner, "gpu", LIMITS)
    return runner


def test_nvimagecodec_decodes_into_device_memory_close_to_pillow(
    quick_model: dict[str, Path], gpu_runner: Runner
) -> None:
    from service.model.image_decoders import NvImageDecoder

    decoder = NvImageDecoder(0)
    datas = val_images(quick_model, 16)
    decoded = decoder.decode([*datas, b"not a jpeg"])
    assert decoded[-1] is None
    for data, image in zip(datas, decoded, strict=False):
        assert image is not None
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert (image.height, image.width) == want.shape[:2]
        got = np.asarray(image.owner.cpu())  # type: ignore[attr-defined]
        assert np.abs(got.astype(int) - want).mean() < 2.0


def test_rows_decoded_on_the_gpu_give_the_cpu_paths_answers(
    gpu_runner: Runner, quick_model: dict[str, Path]
) -> None:
    device = gpu_runner.device_preprocessor
    assert device is not None
    datas = val_images(quick_model, 64)
    outcomes = device.prepare(datas, LIMITS)
    rows = [o[0] for o in outcomes if isinstance(o, tuple)]
    assert len(rows) == len(datas)
    host = np.stack([preprocess_encoded(d, gpu_runner.spec, LIMITS)[0] for d in datas])
    pixels = np.stack([device.read_row(r) for r in rows])
    assert np.abs(pixels.astype(int) - host).mean() < 2.0
    got = gpu_runner.run_items(rows)["probabilities"]
    want = gpu_runner.run(host)["probabilities"]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95
    # Mixed batches (device rows and host images) keep their order.
    mixed = gpu_runner.run_items([rows[0], host[1], rows[2], host[3]])["probabilities"]
    np.testing.assert_allclose(mixed[[1, 3]], want[[1, 3]], atol=1e-4)
    np.testing.assert_allclose(mixed[[0, 2]], got[[0, 2]], atol=1e-4)


def test_the_server_decodes_on_the_gpu_and_answers_as_the_cpu_does(
    start_server: type, quick_model: dict[str, Path], gpu_runner: Runner
) -> None:
    flags = ("--providers", f"{CUDA},{CPU}", "--cudnn-conv-algo-search", "HEURISTIC")
    on_gpu = start_server(quick_model["repository"], *flags, "--decode-device", "gpu")
    on_cpu = start_server(quick_model["repository"], *flags, "--decode-device", "cpu")
    for server in (on_gpu, on_cpu):
        server.wait_for_event("serving", timeout=180)
    assert any("decoded on the GPU" in m for m in on_gpu.messages())
    datas = val_images(quick_model, 32)
    request = [*datas, png(datas[0])]  # the PNG goes through the CPU path
    with on_gpu.client() as gpu_client, on_cpu.client() as cpu_client:
        got = gpu_client.classify(request, top_k=1)
        want = cpu_client.classify(request, top_k=1)
        agree = [g.top.index == w.top.index for g, w in zip(got, want, strict=True)]
        assert np.mean(agree) >= 0.95
        assert got[-1].top.index == want[-1].top.index
        with pytest.raises(grpc.RpcError) as failed:
            gpu_client.classify([datas[0], b"\xff\xd8\xff broken jpeg"])
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image 1" in failed.value.details()
