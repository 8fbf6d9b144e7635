"""The serving resize as a small ONNX graph, so it runs where the pixels are (the GPU).

Used by GPU decoding (``service.model.gpu_decode``): an image decoded into device memory is
resized, cropped or letterboxed there and written into its row of the model's input, so it
never comes back to the host. The graph does what ``service.model.preprocess.resize_to_input``
does with Pillow, from the same ``Geometry``:

    image uint8 [h, w, 3] ─► Cast float ─► Resize (``sizes``; antialiased, as Pillow
    filters with a support widened by the scale) ─► Slice (the centre crop) ─► Pad (the
    letterbox) ─► Round, Clip, Cast ─► uint8 [H, W, 3]

Pillow resizes in two 8-bit passes with fixed-point weights, and nvJPEG's IDCT is not
libjpeg's, so the pixels agree to a level or two, not exactly (the tests bound it).

The graph is built with ``onnx`` (a dependency of the GPU install only), once per model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from service.model.geometry import Geometry
from service.model.gpu_decode import DecodedImage, DeviceRow
from service.model.spec import Interpolation, ModelSpec, ResizeMode

OPSET = 18  # Resize's ``antialias`` and ``axes``

_MODES: dict[Interpolation, dict[str, Any]] = {
    # Pillow's filters: triangle (linear) and Keys cubic with a = -0.5, both widened by the
    # scale when shrinking (antialias); nearest samples floor((x + 0.5) * scale).
    Interpolation.BILINEAR: {"mode": "linear", "antialias": 1},
    Interpolation.BICUBIC: {"mode": "cubic", "antialias": 1, "cubic_coeff_a": -0.5},
    Interpolation.NEAREST: {
        "mode": "nearest",
        "nearest_mode": "floor",
        "coordinate_transformation_mode": "tf_half_pixel_for_nn",
    },
}


def build_resize_graph(spec: ModelSpec) -> bytes:
    """A serialized ONNX model: (image, sizes, crop_starts, crop_ends, pads) → resized."""
    from onnx import TensorProto, helper

    prep = spec.preprocessing
    out_h, out_w = spec.input.height, spec.input.width
    # ONNX Runtime's cubic (and antialiased) Resize wants a 4-D NHWC tensor whose batch
    # and channel scales are 1: the image gets a batch axis of 1 for the resize.
    resize_attrs = {
        "coordinate_transformation_mode": "half_pixel",
        "axes": [1, 2],
        **_MODES[prep.interpolation],
    }
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pixels", "batch_axis"], ["batched"]),
        helper.make_node("Resize", ["batched", "", "", "sizes"], ["resized"], **resize_attrs),
        helper.make_node("Slice", ["resized", "crop_starts", "crop_ends", "axes"], ["cropped"]),
        helper.make_node("Squeeze", ["cropped", "batch_axis"], ["unbatched"]),
        helper.make_node("Pad", ["unbatched", "pads", "pad_value"], ["padded"], mode="constant"),
        helper.make_node("Round", ["padded"], ["rounded"]),
        helper.make_node("Clip", ["rounded", "low", "high"], ["clipped"]),
        helper.make_node("Cast", ["clipped"], ["out"], to=TensorProto.UINT8),
    ]
    constants = [
        helper.make_tensor("batch_axis", TensorProto.INT64, [1], [0]),
        helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
        helper.make_tensor("pad_value", TensorProto.FLOAT, [], [float(prep.pad_value)]),
        helper.make_tensor("low", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("high", TensorProto.FLOAT, [], [255.0]),
    ]
    graph = helper.make_graph(
        nodes,
        "serving_resize",
        [
            helper.make_tensor_value_info("image", TensorProto.UINT8, ["h", "w", 3]),
            helper.make_tensor_value_info("sizes", TensorProto.INT64, [2]),
            helper.make_tensor_value_info("crop_starts", TensorProto.INT64, [2]),
            helper.make_tensor_value_info("crop_ends", TensorProto.INT64, [2]),
            helper.make_tensor_value_info("pads", TensorProto.INT64, [6]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.UINT8, [out_h, out_w, 3])],
        initializer=constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # what every onnxruntime since 1.10 reads
    return bytes(model.SerializeToString())


def resize_inputs(geometry: Geometry, spec: ModelSpec) -> dict[str, np.ndarray]:
    """The graph's size, crop and pad inputs for one image, from its geometry."""
    out_h, out_w = spec.input.height, spec.input.width
    rh, rw = geometry.resized_height, geometry.resized_width
    mode = spec.preprocessing.resize_mode
    top = left = bottom = right = 0
    starts, ends = [0, 0], [rh, rw]
    if mode is ResizeMode.CENTER_CROP:
        y0, x0 = int(-geometry.offset_y), int(-geometry.offset_x)
        starts, ends = [y0, x0], [y0 + out_h, x0 + out_w]
    elif mode is ResizeMode.LETTERBOX:
        top, left = int(geometry.offset_y), int(geometry.offset_x)
        bottom, right = out_h - rh - top, out_w - rw - left
    return {
        "sizes": np.array([rh, rw], np.int64),
        "crop_starts": np.array(starts, np.int64),
        "crop_ends": np.array(ends, np.int64),
        "pads": np.array([top, left, 0, bottom, right, 0], np.int64),
    }


class DeviceResize:
    """The serving resize as an ONNX Runtime session on the
    runner's device: decoded images in, model-input rows out, both in device memory and
    bound by pointer, so nothing is copied through the host. On the CPU provider it runs
    the same way on host memory (the stand-in that tests use where there is no GPU)."""

    def __init__(self, spec: ModelSpec, device: str, device_id: int, providers: list[str]):
        self.spec = spec
        self.device, self.device_id = device, device_id
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the nearest-neighbour mode's deprecation notice
        if device == "cuda":
            # Every node on the GPU, or no session: a resize that silently ran on the CPU
            # would copy each decoded image back to the host and forth again.
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        self._session = ort.InferenceSession(build_resize_graph(spec), options, providers=providers)
        self._row = [spec.input.height, spec.input.width, 3]

    def new_rows(self, count: int) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(
            [count, *self._row], np.uint8, self.device, self.device_id
        )

    def rows_pointer(self, rows: ort.OrtValue) -> int:
        return int(rows.data_ptr())

    def resize_into(self, image: DecodedImage, geometry: Geometry, dst: int) -> None:
        binding = self._session.io_binding()
        binding.bind_input(
            "image",
            self.device,
            self.device_id,
            np.uint8,
            [image.height, image.width, 3],
            image.pointer,
        )
        for name, value in resize_inputs(geometry, self.spec).items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("out", self.device, self.device_id, np.uint8, self._row, dst)
        self._session.run_with_iobinding(binding)

    def read_row(self, row: DeviceRow) -> np.ndarray:
        return np.asarray(row.rows.numpy()[row.index])
