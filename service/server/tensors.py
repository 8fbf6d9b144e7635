"""Open Inference Protocol tensors ⇄ this server's images and answers; shared by the gRPC
and the REST front doors, so both take the same inputs and give the same outputs.

Inputs (exactly one tensor per request):

* ``image_bytes`` — ``BYTES [N]`` (or ``[N, 1]``): encoded images (JPEG, PNG, WebP, …),
  decoded and resized by the server exactly as classifier.v1's Classify does. The model's
  own input name is accepted for BYTES too, as OpenVINO Model Server does.
* the model's input (e.g. ``image``) — ``UINT8 [N, H, W, 3]`` at the model's input size:
  used as it is, no resize; the fast path for clients that preprocess.

Outputs (all of these unless the request names some; CAMs only when named):

* ``probabilities`` ``FP32 [N, C]``; with Triton's classification extension (the
  ``classification`` parameter of a requested output, ``class_count`` in tritonclient)
  it becomes ``BYTES [N, k]`` of ``"score:index:label"``;
* ``boxes`` ``FP32 [N, 4]`` x_min, y_min, x_max, y_max in pixels of the original image
  (of the input tensor for UINT8 inputs), and ``box_scores`` ``FP32 [N]``, for models that
  localize (a box head, or boxes from the CAM);
* ``cam`` ``FP32 [N, K, h, w]`` and ``cam_classes`` ``INT64 [N, K]``, for models with CAMs.

Raw BYTES are the protocol's length-prefixed form: each element a little-endian uint32
length, then its bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.model.errors import InvalidArgumentError
from service.model.geometry import Geometry
from service.model.postprocess import locate, top_k
from service.model.spec import ModelSpec

BYTES_INPUT = "image_bytes"
BOXES = "boxes"
BOX_SCORES = "box_scores"
CLASSIFICATION = "classification"  # Triton's parameter name for class_count

DATATYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.bool_): "BOOL",
}


@dataclass(frozen=True)
class TensorInfo:
    """One input or output as metadata describes it (shape with -1 for the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    raw: bytes | None = None  # raw_input_contents, or the binary-data extension
    contents: Sequence[object] | None = None  # typed contents (gRPC) or JSON "data"


@dataclass(frozen=True)
class OutputRequest:
    name: str
    class_count: int = 0
    parameters: dict[str, object] = field(default_factory=dict)


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray  # for BYTES: an object array of bytes


def model_inputs(spec: ModelSpec) -> list[TensorInfo]:
    h, w = spec.input.height, spec.input.width
    return [
        TensorInfo(BYTES_INPUT, "BYTES", (-1,), optional=True),
        TensorInfo(spec.input.name, "UINT8", (-1, h, w, 3), optional=True),
    ]


def localizes(spec: ModelSpec) -> bool:
    return spec.has_boxes or spec.has_cam


def model_outputs(
    spec: ModelSpec, graph_shapes: Mapping[str, Sequence[object]] | None = None
) -> list[TensorInfo]:
    """The outputs; ``graph_shapes`` (the ONNX outputs' shapes) makes the CAMs' exact."""

    def shape(name: str, fallback: tuple[int, ...]) -> tuple[int, ...]:
        dims = list((graph_shapes or {}).get(name, ()))[1:]
        if dims and all(isinstance(d, int) for d in dims):
            return (-1, *[int(d) for d in dims])  # type: ignore[call-overload]
        return fallback

    out = [TensorInfo(spec.outputs.probabilities, "FP32", (-1, spec.num_classes))]
    if localizes(spec):
        out += [TensorInfo(BOXES, "FP32", (-1, 4)), TensorInfo(BOX_SCORES, "FP32", (-1,))]
    if spec.has_cam:
        cam, classes = str(spec.outputs.cam), str(spec.outputs.cam_classes)
        k = spec.cam_top_k or -1
        out += [
            TensorInfo(cam, "FP32", shape(cam, (-1, k, -1, -1))),
            TensorInfo(classes, "INT64", shape(classes, (-1, k))),
        ]
    return out


def default_outputs(spec: ModelSpec) -> list[OutputRequest]:
    """What a request naming no outputs gets: everything but the CAMs."""
    names = [spec.outputs.probabilities] + ([BOXES, BOX_SCORES] if localizes(spec) else [])
    return [OutputRequest(name) for name in names]


# --- BYTES -------------------------------------------------------------------------------


def pack_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def unpack_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    items, at = [], 0
    view = memoryview(raw)
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidArgumentError(f"input {name!r}: BYTES data ends inside a length prefix")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise InvalidArgumentError(
                f"input {name!r}: a BYTES element declares {size:,} bytes, only "
                f"{len(raw) - at:,} are left"
            )
        items.append(bytes(view[at : at + size]))
        at += size
    if len(items) != count:
        raise InvalidArgumentError(
            f"input {name!r}: shape says {count} elements, the data holds {len(items)}"
        )
    return items


# --- inputs ------------------------------------------------------------------------------


def _count(shape: Sequence[int], name: str) -> int:
    if len(shape) == 2 and shape[1] == 1:
        return int(shape[0])
    if len(shape) != 1:
        raise InvalidArgumentError(
            f"input {name!r}: BYTES images need shape [N] (or [N, 1]), got {list(shape)}"
        )
    return int(shape[0])


def images_from(inputs: Sequence[InputTensor], spec: ModelSpec) -> list[bytes | np.ndarray]:
    """The request's images: encoded bytes (BYTES) or model-sized arrays (UINT8)."""
    valid = (
        f"this model takes {BYTES_INPUT!r} (BYTES [N], encoded images) or "
        f"{spec.input.name!r} (UINT8 [N, {spec.input.height}, {spec.input.width}, 3])"
    )
    if len(inputs) != 1:
        raise InvalidArgumentError(f"expected exactly one input, got {len(inputs)}: {valid}")
    tensor = inputs[0]
    if tensor.name not in (BYTES_INPUT, spec.input.name):
        raise InvalidArgumentError(f"unknown input {tensor.name!r}: {valid}")
    if tensor.datatype == "BYTES":
        count = _count(tensor.shape, tensor.name)
        if tensor.raw is not None:
            return list(unpack_bytes(tensor.raw, count, tensor.name))
        items = [_as_bytes(item, tensor.name) for item in tensor.contents or ()]
        if len(items) != count:
            raise InvalidArgumentError(
                f"input {tensor.name!r}: shape says {count} elements, got {len(items)}"
            )
        return list(items)
    if tensor.datatype == "UINT8" and tensor.name == spec.input.name:
        return list(_uint8_images(tensor, spec))
    raise InvalidArgumentError(f"input {tensor.name!r} of datatype {tensor.datatype}: {valid}")


def _as_bytes(item: object, name: str) -> bytes:
    if isinstance(item, bytes | bytearray):
        return bytes(item)
    raise InvalidArgumentError(f"input {name!r}: BYTES elements must be bytes")


def _uint8_images(tensor: InputTensor, spec: ModelSpec) -> np.ndarray:
    h, w = spec.input.height, spec.input.width
    shape = list(tensor.shape)
    if len(shape) != 4 or shape[1:] != [h, w, 3] or shape[0] < 0:
        raise InvalidArgumentError(
            f"input {tensor.name!r} must be UINT8 [N, {h}, {w}, 3] (the model's input "
            f"size; send BYTES to {BYTES_INPUT!r} to have the server resize), got {shape}"
        )
    expected = shape[0] * h * w * 3
    if tensor.raw is not None:
        if len(tensor.raw) != expected:
            raise InvalidArgumentError(
                f"input {tensor.name!r}: shape {shape} needs {expected:,} bytes, got "
                f"{len(tensor.raw):,}"
            )
        return np.frombuffer(tensor.raw, dtype=np.uint8).reshape(shape)
    try:
        values = np.asarray(tensor.contents if tensor.contents is not None else (), np.int64)
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgumentError(
            f"input {tensor.name!r}: UINT8 data must be integers in 0..255"
        ) from None
    if values.ndim != 1 and tensor.contents is not None:
        raise InvalidArgumentError(f"input {tensor.name!r}: UINT8 data must be integers")
    if values.size != expected:
        raise InvalidArgumentError(
            f"input {tensor.name!r}: shape {shape} needs {expected:,} values, got {values.size:,}"
        )
    if values.size and (values.min() < 0 or values.max() > 255):
        raise InvalidArgumentError(f"input {tensor.name!r}: UINT8 values must be in 0..255")
    return values.astype(np.uint8).reshape(shape)


# --- outputs -----------------------------------------------------------------------------


def check_outputs(requested: Sequence[OutputRequest], spec: ModelSpec) -> None:
    """Refuse, before any work, outputs this model does not have."""
    names = {t.name for t in model_outputs(spec)}
    for output in requested:
        if output.name not in names:
            raise InvalidArgumentError(
                f"unknown output {output.name!r}; this model has: {', '.join(sorted(names))}"
            )
        if output.class_count and output.name != spec.outputs.probabilities:
            raise InvalidArgumentError(
                f"the classification extension applies to {spec.outputs.probabilities!r}, "
                f"not {output.name!r}"
            )
        if output.class_count < 0:
            raise InvalidArgumentError("class_count must be >= 0")


def outputs_for(
    spec: ModelSpec,
    rows: Sequence[dict[str, np.ndarray]],
    geometries: Sequence[Geometry],
    requested: Sequence[OutputRequest],
) -> list[OutputTensor]:
    """The requested outputs for a batch of answered images, in the requested order."""
    n = len(rows)
    probabilities = np.stack([row[spec.outputs.probabilities] for row in rows]).astype(
        np.float32, copy=False
    )
    boxes: np.ndarray | None = None
    scores: np.ndarray | None = None
    out = []
    for output in requested:
        if output.name == spec.outputs.probabilities and output.class_count:
            k = min(output.class_count, spec.num_classes)
            entries = [
                [f"{p.score:f}:{p.index}:{p.label}".encode() for p in top_k(row, k, spec.labels)]
                for row in probabilities
            ]
            array = np.array(entries, dtype=object).reshape(n, k)
            out.append(OutputTensor(output.name, "BYTES", [n, k], array))
        elif output.name == spec.outputs.probabilities:
            out.append(OutputTensor(output.name, "FP32", list(probabilities.shape), probabilities))
        elif output.name in (BOXES, BOX_SCORES):
            if boxes is None or scores is None:
                boxes, scores = _boxes(spec, rows, geometries, probabilities)
            array = boxes if output.name == BOXES else scores
            out.append(OutputTensor(output.name, "FP32", list(array.shape), array))
        else:  # cam, cam_classes: as the model gives them
            array = np.stack([row[output.name] for row in rows])
            out.append(OutputTensor(output.name, DATATYPES[array.dtype], list(array.shape), array))
    return out


def _boxes(
    spec: ModelSpec,
    rows: Sequence[dict[str, np.ndarray]],
    geometries: Sequence[Geometry],
    probabilities: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.zeros((len(rows), 4), np.float32)
    scores = np.zeros(len(rows), np.float32)
    for i, (row, geometry) in enumerate(zip(rows, geometries, strict=True)):
        box, _ = locate(row, geometry, spec, float(probabilities[i].max()))
        boxes[i] = box.as_tuple()
        scores[i] = box.score
    return boxes, scores


def raw_of(tensor: OutputTensor) -> bytes:
    """An output's raw (little-endian, row-major) contents."""
    if tensor.datatype == "BYTES":
        return pack_bytes(list(tensor.array.ravel()))
    return np.ascontiguousarray(tensor.array).astype(tensor.array.dtype.newbyteorder("<")).tobytes()
