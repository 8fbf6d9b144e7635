"""ModelSpec: the one contract between training (which writes it) and serving (which reads it).

An exported model carries its ModelSpec as one JSON value under the ONNX metadata key
``model_spec``. Everything the server needs to use a model correctly lives here: the task,
the labels, the input tensor (uint8 NHWC at a fixed size), the resize policy that must match
training's eval transform, the names and meaning of the outputs, and provenance.

The metadata is parsed with pydantic only: never ``eval`` or ``str`` round-trips. Unknown
extra fields are ignored (a newer exporter may add optional fields); an unknown
``schema_version`` is refused, because that number changes only when meaning changes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = 1
METADATA_KEY = "model_spec"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelSpecError(ValueError):
    """The model file has no ModelSpec, or one this code cannot accept."""


class Task(StrEnum):
    CLASSIFICATION = "classification"
    LOCALIZATION = "localization"


class ResizeMode(StrEnum):
    """How an image of any size becomes the model's fixed input size.

    center_crop: shorter side to ``resize_size`` then a centred crop of the input size.
    letterbox:   the whole image scaled to fit inside the input, aspect kept, padded.
    stretch:     the whole image resized to the input size, aspect not kept.
    """

    CENTER_CROP = "center_crop"
    LETTERBOX = "letterbox"
    STRETCH = "stretch"


class DecodeMode(StrEnum):
    """How encoded images are decoded before the resize, in serving and evaluation alike.

    full:       every pixel.
    jpeg_draft: JPEGs at the smallest DCT scale (1, 1/2, 1/4 or 1/8) whose image still
                covers the resize target on both sides — a fraction of the decoding for
                photos much larger than the model's input. Other formats decode fully.
    """

    FULL = "full"
    JPEG_DRAFT = "jpeg_draft"


class Interpolation(StrEnum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class InputSpec(_Strict):
    name: str = "image"
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    layout: Literal["NHWC"] = "NHWC"
    dtype: Literal["uint8"] = "uint8"


class Preprocessing(_Strict):
    """Training's eval transform, exactly. mean/std are applied inside the graph."""

    resize_mode: ResizeMode
    resize_size: int = Field(gt=0, description="center_crop: shorter side before the crop")
    interpolation: Interpolation = Interpolation.BILINEAR
    pad_value: int = Field(default=114, ge=0, le=255, description="letterbox fill")
    # Models exported before this field decode fully, as they were evaluated.
    decode: DecodeMode = DecodeMode.FULL
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class OutputSpec(_Strict):
    """Output tensor names. ``None`` means the model does not produce that output."""

    probabilities: str = "probabilities"
    boxes: str | None = None
    cam: str | None = None
    cam_classes: str | None = None
    box_format: Literal["xyxy_normalized_input"] = "xyxy_normalized_input"


# The metric an FP16 export records: 1.0 when FP16's top-1 on val stayed within the
# export's limit, 0.0 when it was published past it (--accept-drop). A GPU server runs
# TensorRT in FP16 by default only when it is 1.0.
FP16_GATE_METRIC = "fp16_gate_passed"


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class ModelSpec(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(min_length=1)
    task: Task
    labels: list[str] = Field(min_length=1)
    input: InputSpec
    preprocessing: Preprocessing
    outputs: OutputSpec = OutputSpec()
    cam_threshold: float = Field(default=0.2, gt=0.0, lt=1.0)
    cam_top_k: int = Field(default=0, ge=0)
    backbone: str = ""
    precision: Precision = Precision.FP32
    metrics: dict[str, float] = Field(default_factory=dict)
    checkpoint_sha256: str = ""
    exporter: dict[str, str] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(
                f"unknown model_spec schema_version {value}; this code reads version "
                f"{SCHEMA_VERSION}"
            )
        return value

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def has_boxes(self) -> bool:
        return self.outputs.boxes is not None

    @property
    def has_cam(self) -> bool:
        return self.outputs.cam is not None and self.outputs.cam_classes is not None

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str, *, source: str = "model") -> ModelSpec:
        try:
            return cls.model_validate(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ModelSpecError(f"{source}: '{METADATA_KEY}' metadata is not JSON: {exc}") from exc
        except ValidationError as exc:
            raise ModelSpecError(f"{source}: invalid '{METADATA_KEY}' metadata: {exc}") from exc

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], *, source: str = "model") -> ModelSpec:
        """Read the spec from an ONNX model's metadata_props (as a plain dict)."""
        if METADATA_KEY not in metadata:
            raise ModelSpecError(
                f"{source} has no '{METADATA_KEY}' metadata: it was not exported by "
                "`python -m training export`, so its labels and preprocessing are unknown"
            )
        return cls.from_json(metadata[METADATA_KEY], source=source)
