"""Export: verified ONNX models for three backbone families, and every refusal path."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.model.layout import next_version
from service.model.runner import Runner
from service.model.sessions import trt_fp16_enabled
from service.model.spec import (
    FP16_GATE_METRIC,
    METADATA_KEY,
    DecodeMode,
    ModelSpec,
    ModelSpecError,
    Precision,
)
from tests.conftest import tiny_train_config
from training.config import TrainConfig
from training.evaluate import evaluate_checkpoint, evaluate_onnx
from training.export import (
    ExportError,
    ExportOptions,
    ExportResult,
    ParityTolerance,
    export_checkpoint,
)
from training.quantize import downstream_of
from training.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoints(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-epoch checkpoints (effectively random weights) for three backbone families."""
    out = {}
    for backbone in ("resnet18", "efficientnet_b0", "mobilenet_v3_small"):
        run = tmp_path_factory.mktemp("runs") / backbone
        cfg = TrainConfig.model_validate(tiny_train_config(tiny_demo, run, backbone=backbone))
        out[backbone] = train(cfg, progress=False).best_checkpoint
    return out


@pytest.fixture(scope="module")
def lenet(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch LeNet-5 checkpoint: for the tests of the export's gates and refusals,
    which do not depend on the backbone and run several exports (LeNet's takes a third of
    MobileNetV3's time: torch.onnx's tracing cost grows with the graph)."""
    run = tmp_path_factory.mktemp("runs") / "lenet5"
    cfg = TrainConfig.model_validate(tiny_train_config(tiny_demo, run, backbone="lenet5"))
    return train(cfg, progress=False).best_checkpoint


@pytest.fixture(scope="module")
def exported(
    checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ExportResult]:
    """Each checkpoint exported once into one repository (exports take seconds each)."""
    repository = tmp_path_factory.mktemp("models")
    return {
        backbone: export_checkpoint(ckpt, ExportOptions(repository=repository, name=backbone))
        for backbone, ckpt in checkpoints.items()
    }


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_b0", "mobilenet_v3_small"])
def test_export_passes_parity_and_matches_its_spec(
    backbone: str, exported: dict[str, ExportResult]
) -> None:
    result = exported[backbone]
    assert result.path.parent.name == "1" and result.path.parent.parent.name == backbone
    assert result.parity["max_abs_probability"] <= 1e-4
    assert result.parity["top1_agreement"] == 1.0
    assert result.parity["max_abs_box"] <= 1e-3
    assert result.parity["max_rel_cam"] <= 1e-3

    # The spec in the file is the one export returned (round trip through metadata).
    model = onnx.load(str(result.path))
    metadata = {p.key: p.value for p in model.metadata_props}
    spec = ModelSpec.from_metadata(metadata)
    assert spec == result.spec
    assert spec.backbone == backbone and spec.labels == [str(d) for d in range(10)]
    # Grad-CAM's boxes are scored on val beside the exported CAM's.
    assert 0.0 <= spec.metrics["gradcam_loc_acc"] <= 1.0
    assert 0.0 < spec.metrics["gradcam_mean_iou"] <= 1.0 and "onnx_cam_loc_acc" in spec.metrics

    # Plain onnxruntime sees exactly the interface the spec promises.
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == spec.input.name == "image"
    assert image.type == "tensor(uint8)"
    assert image.shape[1:] == [spec.input.height, spec.input.width, 3]
    assert not isinstance(image.shape[0], int)  # dynamic batch
    names = [o.name for o in session.get_outputs()]
    assert names == ["probabilities", "boxes", "cam", "cam_classes"]
    batch = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    probs, boxes, cam, cam_classes = session.run(None, {"image": batch})
    assert probs.shape == (3, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert boxes.shape == (3, 4)
    assert cam.shape[:2] == (3, spec.cam_top_k) and cam_classes.shape == (3, spec.cam_top_k)
    assert (cam_classes[:, 0] == probs.argmax(axis=1)).all()


def test_onnx_evaluation_agrees_with_the_checkpoint(
    checkpoints: dict[str, Path], exported: dict[str, ExportResult], tiny_demo: Path
) -> None:
    ckpt = checkpoints["mobilenet_v3_small"]
    result = exported["mobilenet_v3_small"]
    torch_metrics = evaluate_checkpoint(ckpt, tiny_demo)
    onnx_metrics = evaluate_onnx(result.path, tiny_demo)
    assert onnx_metrics["samples"] == torch_metrics["samples"] == 40
    assert onnx_metrics["top1"] == pytest.approx(torch_metrics["top1"], abs=0.005)
    assert onnx_metrics["loc_acc"] == pytest.approx(torch_metrics["loc_acc"], abs=0.005)
    assert "cam_loc_acc" in onnx_metrics
    assert result.spec.metrics["onnx_top1"] == pytest.approx(onnx_metrics["top1"], abs=1e-4)


def _repository_state(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_parity_failure_writes_nothing(lenet: Path, tmp_path: Path) -> None:
    impossible = ParityTolerance(probability=-1.0)
    with pytest.raises(ExportError, match="parity failed: probabilities differ"):
        export_checkpoint(
            lenet,
            ExportOptions(repository=tmp_path, name="r", tolerance=impossible),
        )
    assert _repository_state(tmp_path) == ["r"]  # no version, no leftover temp files


def test_an_existing_version_is_never_overwritten(
    checkpoints: dict[str, Path], exported: dict[str, ExportResult]
) -> None:
    first = exported["mobilenet_v3_small"]
    repository = first.path.parents[2]
    before = first.path.read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(
            checkpoints["mobilenet_v3_small"],
            ExportOptions(repository=repository, name="mobilenet_v3_small", version=1),
        )
    assert first.path.read_bytes() == before
    assert next_version(repository, "mobilenet_v3_small") == 2


def test_int8_gate_refuses_then_accepts(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ckpt = checkpoints["mobilenet_v3_small"]
    strict = ExportOptions(
        repository=tmp_path,
        name="q",
        precision=Precision.INT8,
        calibration_images=32,
        per_channel="on",
        max_int8_drop=-1.0,
    )
    with pytest.raises(ExportError, match="--accept-drop"):
        export_checkpoint(ckpt, strict)
    assert _repository_state(tmp_path) == ["q"]
    try:
        export_checkpoint(ckpt, replace(strict, accept_drop=True))
    except ExportError as exc:  # MobileNetV3's squeeze-excite ops make INT8 slow on most CPUs
        assert "slower than FP32" in str(exc) and "--accept-slower" in str(exc)
        assert "squeeze-excite" in str(exc)
    result = export_checkpoint(ckpt, replace(strict, accept_drop=True, accept_slower=True))
    assert result.spec.precision is Precision.INT8
    for key in ("int8_top1", "int8_top1_drop", "int8_cpu_speedup_b8_t2"):
        assert key in result.spec.metrics
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in onnx.load(str(result.path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert session.get_inputs()[0].type == "tensor(uint8)"


def test_the_decode_gate_keeps_draft_decode_only_when_it_passes(
    lenet: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = lenet
    base = ExportOptions(repository=tmp_path, name="d")
    kept = export_checkpoint(ckpt, base)
    assert kept.spec.preprocessing.decode is DecodeMode.JPEG_DRAFT  # training's default
    assert kept.spec.metrics["decode_gate_images"] == 40
    assert kept.spec.metrics["decode_gate_agreement"] == 1.0
    refused = export_checkpoint(ckpt, replace(base, decode_min_agreement=1.01))
    assert Runner(refused.path).spec.preprocessing.decode is DecodeMode.FULL  # in the file
    assert "decode_gate_agreement" in refused.spec.metrics
    assert any("decode: full, because" in r.getMessage() for r in caplog.records)
    asked = export_checkpoint(ckpt, replace(base, full_decode=True))
    assert asked.spec.preprocessing.decode is DecodeMode.FULL
    assert "decode_gate_agreement" not in asked.spec.metrics


def test_fp16_export_keeps_uint8_in_and_float32_out(lenet: Path, tmp_path: Path) -> None:
    options = ExportOptions(repository=tmp_path, name="h", precision=Precision.FP16)
    with pytest.raises(ExportError, match=r"FP16 top-1 .* \(pass --accept-drop"):
        export_checkpoint(lenet, replace(options, max_fp16_drop=-1))
    assert _repository_state(tmp_path) == ["h"]  # nothing published
    # A one-epoch model's near-tied classes may flip in FP16: publish it as asked.
    result = export_checkpoint(lenet, replace(options, accept_drop=True))
    drop = result.spec.metrics["fp16_top1_drop"]
    # The gate's outcome is recorded for GPU servers: TensorRT FP16 only where it passed.
    passed = drop <= options.max_fp16_drop
    assert result.spec.metrics[FP16_GATE_METRIC] == (1.0 if passed else 0.0)
    assert trt_fp16_enabled("auto", result.spec) is passed
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert session.get_outputs()[0].type == "tensor(float)"
    assert result.spec.precision is Precision.FP16
    assert "fp16_top1" in result.spec.metrics


def test_model_without_metadata_is_rejected_on_load(
    exported: dict[str, ExportResult], tmp_path: Path
) -> None:
    model = onnx.load(str(exported["resnet18"].path))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(ModelSpecError, match="has no 'model_spec' metadata"):
        Runner(bare)
    model.metadata_props.add(key=METADATA_KEY, value='{"schema_version": 7}')
    onnx.save(model, str(bare))
    with pytest.raises(ModelSpecError, match="schema_version 7"):
        Runner(bare)


@pytest.mark.parametrize(
    ("backbone", "size"),
    [("lenet5", 48), ("lenet5_gray", 48), ("alexnet", 64), ("inception_v3", 80)],
)
def test_the_classic_backbones_train_export_and_pass_parity(
    backbone: str, size: int, tiny_demo: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig.model_validate(
        tiny_train_config(tiny_demo, tmp_path / "run", backbone=backbone, input_size=size)
    )
    result = train(cfg, progress=False)
    assert np.isfinite(result.best_metrics["top1"])
    exported = export_checkpoint(
        result.best_checkpoint, ExportOptions(repository=tmp_path / "models", name=backbone)
    )
    assert exported.parity["top1_agreement"] == 1.0
    assert exported.parity["max_abs_probability"] <= 1e-4
    assert exported.parity["max_abs_box"] <= 1e-3
    assert exported.spec.backbone == backbone and exported.spec.input.height == size
    # Inception's auxiliary classifier trains but is not part of the served graph.
    names = {init.name for init in onnx.load(str(exported.path)).graph.initializer}
    assert not any("aux_head" in name for name in names)
    runner = Runner(exported.path)
    batch = np.random.default_rng(1).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    assert runner.run(batch)["probabilities"].shape == (2, 10)


def test_a_glimpse_model_trains_exports_and_serves_its_summed_logits(
    tiny_demo: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig.model_validate(
        tiny_train_config(tiny_demo, tmp_path / "run", input_size=64, glimpse_size=8)
    )
    result = train(cfg, progress=False)
    history = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert "train_glimpse" in history[0].split(",")  # its own loss, logged per epoch
    exported = export_checkpoint(
        result.best_checkpoint, ExportOptions(repository=tmp_path / "models", name="glimpse")
    )
    # Parity compares the ONNX graph with the checkpoint's model, glimpse included.
    assert exported.parity["top1_agreement"] == 1.0
    assert exported.parity["max_abs_probability"] <= 1e-4
    graph = onnx.load(str(exported.path)).graph
    assert any(node.op_type == "GridSample" for node in graph.node)  # the crop is in-graph
    assert any("glimpse" in init.name for init in graph.initializer)
    batch = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    out = Runner(exported.path).run(batch)
    assert out["probabilities"].shape == (3, 10) and out["boxes"].shape == (3, 4)
    # The quantized exports skip the gates the FP32 export ran: they say nothing new here.
    lean = ExportOptions(
        repository=tmp_path / "models",
        name="glimpse",
        accept_drop=True,
        full_decode=True,
        gradcam_metrics=False,
    )
    # FP16 keeps the GridSample in float32, which is all ONNX Runtime's CPU kernel takes.
    half = export_checkpoint(result.best_checkpoint, replace(lean, precision=Precision.FP16))
    assert Runner(half.path).run(batch)["probabilities"].shape == (3, 10)
    # INT8 quantizes the trunk's convolutions only: the glimpse stays float, as the other
    # small heads do.
    int8 = export_checkpoint(
        result.best_checkpoint,
        replace(
            lean,
            precision=Precision.INT8,
            calibration_images=64,  # the tiny set has 96 training images
            accept_slower=True,
        ),
    )
    quantized = onnx.load(str(int8.path))
    after_crop = set(downstream_of(quantized, "GridSample"))
    convs = [n for n in quantized.graph.node if n.op_type == "Conv"]
    assert any(n.name in after_crop for n in convs)  # the glimpse's, fed float weights
    assert not any(
        n.op_type == "DequantizeLinear" for n in quantized.graph.node if n.name in after_crop
    )
    assert any(n.op_type == "DequantizeLinear" for n in quantized.graph.node)  # the trunk's
    assert Runner(int8.path).run(batch)["probabilities"].shape == (3, 10)


def test_a_glimpse_needs_box_data(tiny_demo: Path, tmp_path: Path) -> None:
    data = tmp_path / "no-boxes"
    for split in ("train", "val"):
        shutil.copytree(tiny_demo / split, data / split)
    cfg = TrainConfig.model_validate(
        tiny_train_config(data, tmp_path / "run", input_size=64, glimpse_size=8)
    )
    with pytest.raises(ValueError, match="glimpse_size 8 needs box data"):
        train(cfg, progress=False)
