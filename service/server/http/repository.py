"""The Open Inference Protocol's repository extension over REST:

POST /v2/repository/index              every version and its state ({"ready": true}: ready)
POST /v2/repository/models/{m}/load    rescan and serve a model now
POST /v2/repository/models/{m}/unload  retire every version of a model
GET  /v2/repository/models/{m}/traffic the split of calls that name no version
PUT  /v2/repository/models/{m}/traffic {"weights": {"1": 90, "2": 10}}: publish a new split
DELETE /v2/repository/models/{m}/traffic withdraw it (``service.server.traffic``)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.server.calls import CallInfo
from service.server.domain import Traffic
from service.server.http.body import IndexRequestBody, TrafficRequestBody, parse_json, validated
from service.server.http.envelope import parts, respond

router = APIRouter()


@router.post("/v2/repository/index", tags=["repository"])
async def repository_index(request: Request) -> Response:
    settings, plane = parts(request).settings, parts(request).plane

    async def run(call: CallInfo) -> Response:
        body = await request.body()
        what = "the repository index request"
        ready_only = bool(body) and (
            validated(IndexRequestBody, parse_json(body, settings.max_json_depth, what), what).ready
        )
        return JSONResponse(
            [
                {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
                for e in plane.index(ready_only)
            ]
        )

    return await parts(request).envelope.run("http:RepositoryIndex", request, None, run)


async def _control(
    request: Request, method: str, model: str, action: Callable[[CallInfo, str], Awaitable[None]]
) -> Response:
    async def run(call: CallInfo) -> Response:
        await action(call, model)
        return JSONResponse({})

    return await parts(request).envelope.run(method, request, None, run)


@router.post("/v2/repository/models/{model}/load", tags=["repository"])
async def load(request: Request, model: str) -> Response:
    return await _control(request, "http:RepositoryModelLoad", model, parts(request).plane.load)


@router.post("/v2/repository/models/{model}/unload", tags=["repository"])
async def unload(request: Request, model: str) -> Response:
    action = parts(request).plane.unload
    return await _control(request, "http:RepositoryModelUnload", model, action)


def _traffic_json(traffic: Traffic) -> dict[str, Any]:
    return {
        "model": traffic.model,
        "weights": traffic.weights,
        "source": traffic.source,
        "ready_versions": traffic.ready,
    }


@router.get("/v2/repository/models/{model}/traffic", tags=["repository"])
async def get_traffic(request: Request, model: str) -> Response:
    plane = parts(request).plane

    def build(call: CallInfo) -> Response:
        return JSONResponse(_traffic_json(plane.traffic(call, model)))

    return await respond(request, "http:RepositoryTraffic", model, build)


@router.put("/v2/repository/models/{model}/traffic", tags=["repository"])
async def set_traffic(request: Request, model: str) -> Response:
    settings, plane = parts(request).settings, parts(request).plane

    async def run(call: CallInfo) -> Response:
        what = "the traffic request"
        body = validated(
            TrafficRequestBody,
            parse_json(await request.body(), settings.max_json_depth, what),
            what,
        )
        return JSONResponse(_traffic_json(plane.set_traffic(call, model, body.weights)))

    return await parts(request).envelope.run("http:RepositorySetTraffic", request, model, run)


@router.delete("/v2/repository/models/{model}/traffic", tags=["repository"])
async def clear_traffic(request: Request, model: str) -> Response:
    plane = parts(request).plane

    def build(call: CallInfo) -> Response:
        return JSONResponse(_traffic_json(plane.clear_traffic(call, model)))

    return await respond(request, "http:RepositoryClearTraffic", model, build)
