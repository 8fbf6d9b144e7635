"""Health and metadata routes of the Open Inference Protocol over REST:

    GET /v2/health/live | /v2/health/ready   {"live": true} / {"ready": true} (503 if not)
    GET /v2                                  server metadata
    GET /v2/models/{m}[/versions/{v}]        model metadata; .../ready; .../config

Health needs no token (probes carry none); the rest runs in the envelope.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.server.calls import CallInfo
from service.server.domain import ModelMetadata
from service.server.http.envelope import parts, respond
from service.server.oip_config import config_json
from service.server.tensors import TensorInfo

# The binary-data extension is REST's own.
HTTP_EXTENSIONS = ("binary_tensor_data",)

router = APIRouter()


def _tensor(info: TensorInfo) -> dict[str, Any]:
    return {"name": info.name, "datatype": info.datatype, "shape": list(info.shape)}


@router.get("/v2/health/live", tags=["health"])
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", tags=["health"])
async def ready(request: Request) -> Response:
    ok = parts(request).plane.server_ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/v2", tags=["metadata"])
async def server_metadata(request: Request) -> Response:
    plane = parts(request).plane

    def build(call: CallInfo) -> Response:
        meta = plane.server_metadata()
        extensions = [*meta.extensions, *HTTP_EXTENSIONS]
        return JSONResponse({"name": meta.name, "version": meta.version, "extensions": extensions})

    return await respond(request, "http:ServerMetadata", None, build)


def _metadata(meta: ModelMetadata) -> dict[str, Any]:
    return {
        "name": meta.name,
        "versions": meta.versions,
        "platform": meta.platform,
        "inputs": [_tensor(i) for i in meta.inputs],
        "outputs": [_tensor(o) for o in meta.outputs],
    }


@router.get("/v2/models/{model}", tags=["metadata"])
@router.get("/v2/models/{model}/versions/{version}", tags=["metadata"])
async def model_metadata(request: Request, model: str, version: str = "") -> Response:
    plane = parts(request).plane

    def build(call: CallInfo) -> Response:
        return JSONResponse(_metadata(plane.model_metadata(call, model, version)))

    return await respond(request, "http:ModelMetadata", model, build)


@router.get("/v2/models/{model}/ready", tags=["health"])
@router.get("/v2/models/{model}/versions/{version}/ready", tags=["health"])
async def model_ready(request: Request, model: str, version: str = "") -> Response:
    plane = parts(request).plane

    def build(call: CallInfo) -> Response:
        ok = plane.model_ready(call, model, version)
        return JSONResponse({"name": model, "ready": ok}, status_code=200 if ok else 503)

    return await respond(request, "http:ModelReady", model, build)


@router.get("/v2/models/{model}/config", tags=["metadata"])
@router.get("/v2/models/{model}/versions/{version}/config", tags=["metadata"])
async def model_config(request: Request, model: str, version: str = "") -> Response:
    plane = parts(request).plane

    def build(call: CallInfo) -> Response:
        return JSONResponse(config_json(plane.model_config(call, model, version)))

    return await respond(request, "http:ModelConfig", model, build)
