"""Upload routes, for people without an Open Inference Protocol client (and the page):

GET  /v1/models                          the models and versions
POST /v1/models/{m}:classify | :localize an image upload (multipart, or a raw body);
                                         ?top_k=, ?version=, ?heatmap=1
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.model.errors import InvalidArgumentError
from service.model.results import Localization, Prediction
from service.server.calls import CallInfo
from service.server.config import Settings
from service.server.domain import ImageRequest, ModelSummary
from service.server.http.envelope import parts, respond

router = APIRouter()


def _model(model: ModelSummary) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": model.name,
        "version": model.version,
        "state": model.state.value,
        "error": model.error,
    }
    if model.spec is not None:
        spec = model.spec
        item.update(
            task=spec.task.value, labels=spec.labels, has_boxes=spec.has_boxes, has_cam=spec.has_cam
        )
    return item


def _predictions(items: list[Prediction]) -> list[dict[str, Any]]:
    return [{"index": p.index, "label": p.label, "score": p.score} for p in items]


def _localization(item: Localization) -> dict[str, Any]:
    box = item.box
    answer: dict[str, Any] = {
        "predictions": _predictions(item.predictions),
        "box": {
            "x_min": box.x_min,
            "y_min": box.y_min,
            "x_max": box.x_max,
            "y_max": box.y_max,
            "score": box.score,
        },
        "box_source": item.box_source,
    }
    if item.heatmap is not None:
        answer["heatmap"] = {
            "height": item.heatmap.height,
            "width": item.heatmap.width,
            "values": np.round(item.heatmap.values.astype(np.float64), 4).tolist(),
        }
    return answer


async def uploaded_images(request: Request, settings: Settings) -> list[bytes]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=settings.max_images_per_request + 1)
        images = [await part.read() for _, part in form.multi_items() if hasattr(part, "read")]
        await form.close()
        if not images:
            raise InvalidArgumentError("the form has no file fields; upload an image file")
        return images
    body = await request.body()
    if not body:
        raise InvalidArgumentError(
            "no image: send it as the body (Content-Type image/jpeg, ...) or as a "
            "multipart form file"
        )
    return [body]


async def image_request(request: Request, model: str) -> ImageRequest:
    """The upload as the data plane's request (``top_k`` 0: the default; "0" asks for 1)."""
    images = await uploaded_images(request, parts(request).settings)
    text = request.query_params.get("top_k", "")
    if text and not text.isdigit():
        raise InvalidArgumentError(f"top_k must be a positive number, got {text!r}")
    return ImageRequest(
        model=model,
        version=request.query_params.get("version", ""),
        images=images,
        top_k=max(1, int(text)) if text else 0,
        size_bytes=sum(len(i) for i in images),
    )


@router.get("/v1/models", tags=["upload"])
async def list_models(request: Request) -> Response:
    plane = parts(request).plane

    def build(call: CallInfo) -> Response:
        return JSONResponse({"models": [_model(m) for m in plane.models()]})

    return await respond(request, "http:ListModels", None, build)


@router.post("/v1/models/{model}:classify", tags=["upload"])
async def classify(request: Request, model: str) -> Response:
    plane = parts(request).plane

    async def run(call: CallInfo) -> Response:
        answer = await plane.classify(call, await image_request(request, model))
        results = [{"predictions": _predictions(p)} for p in answer.results]
        return JSONResponse({"model": answer.model, "version": answer.version, "results": results})

    return await parts(request).envelope.run("http:Classify", request, model, run)


@router.post("/v1/models/{model}:localize", tags=["upload"])
async def localize(request: Request, model: str) -> Response:
    plane = parts(request).plane

    async def run(call: CallInfo) -> Response:
        heatmap = request.query_params.get("heatmap", "").lower() in ("1", "true")
        answer = await plane.localize(call, await image_request(request, model), heatmap)
        results = [_localization(item) for item in answer.results]
        return JSONResponse({"model": answer.model, "version": answer.version, "results": results})

    return await parts(request).envelope.run("http:Localize", request, model, run)
