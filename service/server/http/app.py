"""The HTTP front door: the Open Inference Protocol v2 over REST, upload routes for people
without an OIP client, OpenAPI docs and a page to try a model — the same data plane,
limits, metrics, access log, TLS files and tokens as the gRPC port.

    GET  /v2, /v2/health/*, /v2/models/{m}[/versions/{v}][/ready|/config]   (health)
    POST /v2/models/{m}[/versions/{v}]/infer                                (infer)
    GET  /v2/models[/{m}[/versions/{v}]]/stats                              (statistics)
    POST /v2/repository/index | /v2/repository/models/{m}/load | .../unload (repository)
    GET  /v1/models; POST /v1/models/{m}:classify | :localize               (upload)
    GET  /docs, /openapi.json                                               OpenAPI
    GET  /                                                                  (page)

One ``APIRouter`` per area, each in its module; ``server`` runs the app.
"""

from __future__ import annotations

from fastapi import FastAPI

from service import __version__
from service.server.calls import CallEnvelope
from service.server.config import Settings
from service.server.dataplane import DataPlane
from service.server.http import health, infer, page, repository, statistics, upload
from service.server.http.envelope import HttpEnvelope, Parts


def create_app(settings: Settings, plane: DataPlane, envelope: CallEnvelope) -> FastAPI:
    app = FastAPI(
        title="imgclf",
        version=__version__,
        description="Image classification and localization: the Open Inference Protocol "
        "v2 (KServe/Triton) and upload routes.",
    )
    app.state.parts = Parts(settings, plane, HttpEnvelope(envelope))
    # statistics before health: /v2/models/stats is not model metadata for a model "stats"
    for area in (statistics, health, infer, repository, upload, page):
        app.include_router(area.router)
    return app
