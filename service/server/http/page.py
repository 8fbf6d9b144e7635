"""The page to try a model (``GET /``) and its static files (``service/static/``)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

STATIC = resources.files("service") / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return FileResponse(str(STATIC / "index.html"), media_type="text/html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        return JSONResponse({"error": f"no static file {name!r}"}, status_code=404)
    return FileResponse(str(path))
