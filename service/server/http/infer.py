"""Inference over REST, the Open Inference Protocol's ``POST
/v2/models/{m}[/versions/{v}]/infer``: JSON tensors, or Triton's binary-data extension
(a JSON header of ``Inference-Header-Content-Length`` bytes, then the tensors' raw bytes).
BYTES elements in a JSON body are base64 strings; binary data are raw. This module turns
the body into the data plane's ``TensorRequest`` and its answer back into a body.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.model.errors import InvalidArgumentError
from service.server.calls import CallInfo
from service.server.domain import Answer, TensorRequest
from service.server.http.body import InferRequestBody, flatten, parse_json, validated
from service.server.http.envelope import parts
from service.server.online import deadline_of
from service.server.tensors import (
    CLASSIFICATION,
    InputTensor,
    OutputRequest,
    OutputTensor,
    raw_of,
)

HEADER_LENGTH = "inference-header-content-length"

router = APIRouter()


def split_body(
    body: bytes, header_length: str | None, max_depth: int
) -> tuple[InferRequestBody, bytes]:
    """The validated JSON header and the binary tail of an inference request."""
    if header_length is None:
        size = len(body)
    elif header_length.isdigit() and int(header_length) <= len(body):
        size = int(header_length)
    else:
        raise InvalidArgumentError(
            f"Inference-Header-Content-Length {header_length!r} does not fit a body of "
            f"{len(body):,} bytes"
        )
    header = parse_json(body[:size], max_depth, "the inference request")
    return validated(InferRequestBody, header, "the inference request"), body[size:]


def input_tensors(request: InferRequestBody, binary: bytes) -> list[InputTensor]:
    tensors, at = [], 0
    for item in request.inputs:
        if any(d < 0 for d in item.shape):
            raise InvalidArgumentError(
                f"input {item.name!r}: shape {item.shape} has a dimension < 0"
            )
        size = item.parameter("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or at + size > len(binary):
                raise InvalidArgumentError(
                    f"input {item.name!r}: binary_data_size {size!r} is not a byte count "
                    f"within the {len(binary) - at:,} binary bytes left"
                )
            tensors.append(
                InputTensor(item.name, item.datatype, item.shape, raw=binary[at : at + size])
            )
            at += size
            continue
        values = flatten(item.data if item.data is not None else [])
        if item.datatype == "BYTES":
            values = [_base64(v, item.name) for v in values]
        tensors.append(InputTensor(item.name, item.datatype, item.shape, contents=values))
    if at != len(binary):
        raise InvalidArgumentError(
            f"{len(binary) - at:,} binary bytes after the inputs that no input claims"
        )
    return tensors


def _base64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"input {name!r}: BYTES elements in JSON are base64 strings")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgumentError(
            f"input {name!r}: a BYTES element is not base64 (send images base64-encoded, or "
            "as binary data)"
        ) from None


def requested_outputs(request: InferRequestBody) -> tuple[list[OutputRequest], set[str]]:
    """The requested outputs, and which of them go back as binary data."""
    everything_binary = _flag(request.parameter("binary_data_output"), "binary_data_output")
    requested, binary = [], set()
    for item in request.outputs or []:
        parameters = dict(item.parameters or {})
        class_count = parameters.pop(CLASSIFICATION, 0) or 0
        if type(class_count) is not int or class_count < 0:
            raise InvalidArgumentError(
                f"output {item.name!r}: {CLASSIFICATION} must be a class count >= 0, "
                f"got {class_count!r}"
            )
        if _flag(parameters.pop("binary_data", everything_binary), "binary_data"):
            binary.add(item.name)
        requested.append(OutputRequest(item.name, class_count, parameters))
    return requested, binary


def _flag(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    raise InvalidArgumentError(f"parameter {name} must be true or false, got {value!r}")


def timeout_seconds(request: InferRequestBody) -> float | None:
    """The request's ``timeout`` parameter (microseconds, as Triton's), in seconds."""
    value = request.parameter("timeout")
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidArgumentError(f"parameter timeout must be microseconds >= 0, got {value!r}")
    return float(value) / 1e6


def infer_response(
    answer: Answer[list[OutputTensor]], request_id: str, binary: set[str]
) -> Response:
    described, blobs = [], []
    for tensor in answer.results:
        item: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        if tensor.name in binary:
            blob = raw_of(tensor)
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif tensor.datatype == "BYTES":
            item["data"] = [v.decode("utf-8", "replace") for v in tensor.array.ravel()]
        else:
            item["data"] = np.asarray(tensor.array).ravel().tolist()
        described.append(item)
    header: dict[str, Any] = {
        "model_name": answer.model,
        "model_version": answer.version,
        "outputs": described,
    }
    if request_id:
        header["id"] = request_id
    body = json.dumps(header).encode()
    if not blobs:
        return Response(body, media_type="application/json")
    return Response(
        body + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(body))},
    )


@router.post("/v2/models/{model}/infer", tags=["inference"])
@router.post("/v2/models/{model}/versions/{version}/infer", tags=["inference"])
async def infer(request: Request, model: str, version: str = "") -> Response:
    settings, plane = parts(request).settings, parts(request).plane

    async def run(call: CallInfo) -> Response:
        body = await request.body()
        header, binary = split_body(
            body, request.headers.get(HEADER_LENGTH), settings.max_json_depth
        )
        deadline = deadline_of(timeout_seconds(header))
        requested, binary_outputs = requested_outputs(header)
        inputs = input_tensors(header, binary)
        tensors = TensorRequest(model, version, inputs, requested, deadline, len(body))
        answer = await plane.infer(call, tensors)
        if not requested and header.parameter("binary_data_output"):
            binary_outputs = {o.name for o in answer.results}  # the default outputs
        request_id = "" if header.id is None else str(header.id)
        return infer_response(answer, request_id, binary_outputs)

    return await parts(request).envelope.run("http:ModelInfer", request, model, run)
