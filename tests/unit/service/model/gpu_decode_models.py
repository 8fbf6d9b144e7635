"""A tiny ONNX model with a real ModelSpec, built in a few milliseconds: what the GPU
decode path's unit tests run through the runner (they start nothing and train nothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.model.spec import (
    METADATA_KEY,
    InputSpec,
    ModelSpec,
    Preprocessing,
    ResizeMode,
    Task,
)


def spec_for(mode: ResizeMode = ResizeMode.CENTER_CROP, size: int = 64) -> ModelSpec:
    return ModelSpec(
        name="tiny",
        task=Task.CLASSIFICATION,
        labels=[str(i) for i in range(4)],
        input=InputSpec(height=size, width=size),
        preprocessing=Preprocessing(resize_mode=mode, resize_size=int(size * 1.14)),
    )


def write_tiny_model(path: Path, spec: ModelSpec) -> Path:
    """image uint8 [N, H, W, 3] → mean colour of four quadrants → softmax over 4 classes:
    different pixels give different probabilities, so a wrong row shows."""
    import onnx
    from onnx import TensorProto, helper

    h, w = spec.input.height, spec.input.width
    weights = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["x", "quad_shape"], ["q"]),
        helper.make_node("ReduceMean", ["q", "quad_axes"], ["m"], keepdims=0),
        helper.make_node("Reshape", ["m", "flat"], ["f"]),
        helper.make_node("Div", ["f", "scale"], ["g"]),
        helper.make_node("MatMul", ["g", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    inits = [
        helper.make_tensor("quad_shape", TensorProto.INT64, [6], [-1, 2, h // 2, 2, w // 2, 3]),
        helper.make_tensor("quad_axes", TensorProto.INT64, [2], [2, 4]),
        helper.make_tensor("flat", TensorProto.INT64, [2], [-1, 12]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [16.0]),
        helper.make_tensor("w", TensorProto.FLOAT, [12, 4], weights.flatten().tolist()),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", h, w, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, spec.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
