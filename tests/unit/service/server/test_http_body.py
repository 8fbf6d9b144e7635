"""REST bodies: bounded JSON parsing, validation that names the problem, and flattening
without recursion (a body nested 100,000 deep is an InvalidArgumentError, not a 500)."""

from __future__ import annotations

import pytest

from service.model.errors import InvalidArgumentError
from service.server.http.body import (
    InferRequestBody,
    flatten,
    json_depth_exceeds,
    parse_json,
    validated,
)


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def test_depth_is_checked_after_parsing_and_runaway_nesting_is_refused() -> None:
    assert parse_json(nested(32).encode(), 32) == eval(nested(32))
    for depth in (33, 3000, 100_000):
        with pytest.raises(InvalidArgumentError, match="max_json_depth") as refused:
            parse_json(nested(depth).encode(), 32, "the inference request")
        assert "the inference request" in refused.value.message
    with pytest.raises(InvalidArgumentError, match="not JSON"):
        parse_json(b"{'single': quotes}", 32)
    with pytest.raises(InvalidArgumentError, match="not JSON"):
        parse_json(b"\xff\xfe", 32)


def test_depth_counts_objects_and_lists_alike_without_recursion() -> None:
    value: object = 1
    for i in range(200_000):
        value = {"a": value} if i % 2 else [value]
    assert json_depth_exceeds(value, 64)
    assert not json_depth_exceeds({"a": [1, [2, {"b": 3}]]}, 4)
    assert json_depth_exceeds({"a": [1, [2, {"b": [3]}]]}, 4)


def test_flatten_is_row_major_and_survives_any_depth() -> None:
    assert flatten([[1, 2], [3, [4, 5]], 6]) == [1, 2, 3, 4, 5, 6]
    assert flatten(7) == [7]
    assert flatten([]) == []
    deep: list[object] = [9]
    for _ in range(100_000):
        deep = [deep]
    assert flatten(deep) == [9]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({}, "inputs"),
        ({"inputs": "image"}, "inputs"),
        ({"inputs": [{"name": "x", "datatype": "BYTES"}]}, "shape"),
        ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": ["a"]}]}, "shape"),
        ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1.5]}]}, "shape"),
        ({"inputs": [{"name": 3, "datatype": "BYTES", "shape": [1]}]}, "name"),
        ({"inputs": [], "parameters": [1]}, "parameters"),
        ({"inputs": [], "outputs": [{"parameters": {}}]}, "outputs.0.name"),
        ([1, 2], "body"),
    ],
)
def test_malformed_requests_name_what_is_wrong(body: object, named: str) -> None:
    with pytest.raises(InvalidArgumentError, match="is malformed") as refused:
        validated(InferRequestBody, body, "the inference request")
    assert named in refused.value.message


def test_a_valid_request_keeps_its_parts_and_ignores_unknown_fields() -> None:
    request = validated(
        InferRequestBody,
        {
            "id": 7,
            "inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES", "extra": 1}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
            "parameters": {"timeout": 100},
        },
        "the inference request",
    )
    assert request.inputs[0].shape == [2] and request.parameter("timeout") == 100
    assert request.outputs[0].parameters == {"classification": 3}
