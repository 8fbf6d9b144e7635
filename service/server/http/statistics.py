"""The Open Inference Protocol's statistics extension over REST (Triton's JSON):

    GET /v2/models/stats                          every ready version
    GET /v2/models/{m}/stats                      a model's ready versions
    GET /v2/models/{m}/versions/{v}/stats         one version

``{"model_stats": [{"name", "version", "last_inference", "inference_count",
"execution_count", "inference_stats": {"success": {"count", "ns"}, ...}, "batch_stats":
[...]}]}``, read by ``service.server.statistics``. Registered before the metadata routes,
which would otherwise take ``stats`` for a model name.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.server.calls import CallInfo
from service.server.http.envelope import parts, respond
from service.server.statistics import Duration, ModelStatistics

router = APIRouter()


def _duration(duration: Duration) -> dict[str, int]:
    return {"count": duration.count, "ns": duration.ns}


def statistics_json(stats: ModelStatistics) -> dict[str, Any]:
    return {
        "name": stats.name,
        "version": stats.version,
        "last_inference": stats.last_inference,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {stat: _duration(d) for stat, d in stats.inference_stats.items()},
        "batch_stats": [
            {
                "batch_size": b.batch_size,
                "compute_input": _duration(b.compute_input),
                "compute_infer": _duration(b.compute_infer),
                "compute_output": _duration(b.compute_output),
            }
            for b in stats.batch_stats
        ],
    }


@router.get("/v2/models/stats", tags=["statistics"])
@router.get("/v2/models/{model}/stats", tags=["statistics"])
@router.get("/v2/models/{model}/versions/{version}/stats", tags=["statistics"])
async def model_statistics(request: Request, model: str = "", version: str = "") -> Response:
    plane = parts(request).plane

    def build(call: CallInfo) -> Response:
        stats = plane.statistics(call, model, version)
        return JSONResponse({"model_stats": [statistics_json(s) for s in stats]})

    return await respond(request, "http:ModelStatistics", model or None, build)
