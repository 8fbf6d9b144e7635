"""The ModelSpec contract: validation, JSON round trip, clear refusals."""

from __future__ import annotations

import json

import pytest

from service.model.spec import (
    METADATA_KEY,
    InputSpec,
    ModelSpec,
    ModelSpecError,
    OutputSpec,
    Preprocessing,
    ResizeMode,
    Task,
)


def _spec() -> ModelSpec:
    return ModelSpec(
        name="demo",
        task=Task.LOCALIZATION,
        labels=["a", "b"],
        input=InputSpec(height=64, width=48),
        preprocessing=Preprocessing(resize_mode=ResizeMode.LETTERBOX, resize_size=64),
        outputs=OutputSpec(boxes="boxes", cam="cam", cam_classes="cam_classes"),
        cam_top_k=2,
    )


def test_round_trip_through_metadata() -> None:
    spec = _spec()
    again = ModelSpec.from_metadata({METADATA_KEY: spec.to_json()})
    assert again == spec
    assert again.has_boxes and again.has_cam and again.num_classes == 2


def test_missing_metadata_is_refused_with_a_reason() -> None:
    with pytest.raises(ModelSpecError, match="has no 'model_spec' metadata"):
        ModelSpec.from_metadata({"producer": "x"}, source="m.onnx")


def test_unknown_schema_version_is_refused() -> None:
    data = json.loads(_spec().to_json())
    data["schema_version"] = 99
    with pytest.raises(ModelSpecError, match="unknown model_spec schema_version 99"):
        ModelSpec.from_metadata({METADATA_KEY: json.dumps(data)})


def test_not_json_and_invalid_fields_are_refused() -> None:
    with pytest.raises(ModelSpecError, match="not JSON"):
        ModelSpec.from_metadata({METADATA_KEY: "{'python': 'repr'}"})
    data = json.loads(_spec().to_json())
    data["preprocessing"]["resize_mode"] = "squash"
    with pytest.raises(ModelSpecError, match="resize_mode"):
        ModelSpec.from_metadata({METADATA_KEY: json.dumps(data)})


def test_fields_added_by_newer_exporters_are_ignored() -> None:
    spec = _spec()
    data = json.loads(spec.to_json())
    data["future_field"] = {"anything": 1}
    assert ModelSpec.from_metadata({METADATA_KEY: json.dumps(data)}) == spec
