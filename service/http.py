"""The HTTP port: the Open Inference Protocol v2 over REST, upload routes for people
without an OIP client, OpenAPI docs and a page to try a model — the same pipeline,
limits, metrics, access log, TLS files and tokens as the gRPC port.

    GET  /v2                                 server metadata
    GET  /v2/health/live | /v2/health/ready  {"live": true} / {"ready": true} (503 if not)
    GET  /v2/models/{m}[/versions/{v}]       model metadata; .../ready; .../config
    POST /v2/models/{m}[/versions/{v}]/infer JSON tensors, or Triton's binary-data extension
    POST /v2/repository/index | /v2/repository/models/{m}/load | .../unload
    GET  /v1/models                          the models and versions (what the page lists)
    POST /v1/models/{m}:classify | :localize an image upload (multipart or a raw body)
    GET  /docs, /openapi.json                OpenAPI
    GET  /                                   the page (service/static/)

It runs in the gRPC server's process and event loop: uvicorn serves a socket we bound
(port 0 picks a free one), and shutdown is ours — during the drain /v2/health/ready says
503 while requests are still served, then the socket closes and in-flight requests get
the grace period. Errors are ``{"error": "... (request id ...)"}`` with the HTTP status
of the matching gRPC code, an ``x-request-id`` and a ``classifier-error-reason`` header.
BYTES elements in a JSON body are base64 strings; binary data (the extension) are raw.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from typing import Any

import grpc
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from google.protobuf.json_format import MessageToDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.auth import AUTH_HEADER, TokenStore
from service.calls import CallInfo, CallLog
from service.config import Settings
from service.metrics import UNKNOWN_MODEL
from service.model.errors import (
    REASON_KEY,
    REQUEST_ID_KEY,
    InvalidArgumentError,
    LimitExceededError,
    ServiceError,
    UnauthenticatedError,
    UnavailableError,
)
from service.model.postprocess import check_can_localize, localizations, top_k
from service.oip import EXTENSIONS, PLATFORM, SERVER_NAME, InferenceServicer
from service.online import RequestPipeline, deadline_of
from service.repository import ModelRepository, ModelVersion, VersionState
from service.rest_body import (
    IndexRequestBody,
    InferRequestBody,
    flatten,
    parse_json,
    validated,
)
from service.status import drop_references, http_status, reason, status_code
from service.tensors import (
    CLASSIFICATION,
    InputTensor,
    OutputRequest,
    OutputTensor,
    check_outputs,
    default_outputs,
    images_from,
    model_inputs,
    model_outputs,
    outputs_for,
    raw_of,
)
from service.tls import ServerCertificates

log = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"
HTTP_EXTENSIONS = [*EXTENSIONS, "binary_tensor_data"]
OPEN_PATHS = ("/v2/health/", "/docs", "/openapi.json", "/static/")
STATIC = resources.files("service") / "static"
# How often the HTTP port looks at its TLS files (the gRPC port looks per connection).
TLS_RECHECK_SECONDS = 1.0


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (413) before reading them whole."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(int(declared), self.limit, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge(seen)
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge as exc:
            await _too_large(exc.size, self.limit, send)


class _BodyTooLarge(Exception):
    def __init__(self, size: int):
        self.size = size


async def _too_large(size: int, limit: int, send: Send) -> None:
    error = LimitExceededError(
        "request body in bytes", size, limit, setting="max_receive_message_bytes"
    )
    body = json.dumps({"error": error.message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (REASON_KEY.encode(), b"limit")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HttpCalls:
    """The HTTP twin of ``service.envelope``: request id, errors → status, metrics, log."""

    def __init__(self, calls: CallLog, tokens: TokenStore):
        self.calls = calls
        self.tokens = tokens

    async def run(
        self,
        method: str,
        request: Request,
        model: str | None,
        handler: Callable[[CallInfo], Awaitable[Response]],
    ) -> Response:
        started = time.perf_counter()
        request_id = self.calls.request_id(request.headers.get(REQUEST_ID_KEY))
        call = CallInfo(self.calls.label_for(model))
        code, message, why = grpc.StatusCode.OK, "", ""
        response: Response | None = None
        try:
            if self.tokens.enabled and not self.tokens.accepts(request.headers.get(AUTH_HEADER)):
                call.model = UNKNOWN_MODEL
                raise UnauthenticatedError(
                    "missing or wrong token: send header 'authorization: Bearer <token>'"
                )
            response = await handler(call)
        except ServiceError as exc:
            code, message, why = status_code(exc), exc.message, reason(exc)
            drop_references(exc)
        except Exception:
            log.exception("request %s %s failed unexpectedly", request_id, method)
            code, message, why = grpc.StatusCode.INTERNAL, "internal error", "internal"
        finally:
            peer = f"ipv4:{request.client.host}:{request.client.port}" if request.client else ""
            self.calls.account(
                method, call, code.name, time.perf_counter() - started, request_id, peer, message
            )
        if response is None:
            response = JSONResponse(
                {"error": f"{message} (request id {request_id})"},
                status_code=http_status(code),
                headers={REASON_KEY: why},
            )
        response.headers[REQUEST_ID_KEY] = request_id
        return response


# --- the binary-data extension and JSON tensors ------------------------------------------


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
    entry: ModelVersion,
    request_id: str,
    outputs: list[OutputTensor],
    binary: set[str],
) -> Response:
    described, blobs = [], []
    for tensor in outputs:
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
        "model_name": entry.name,
        "model_version": str(entry.version),
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


# --- the app -----------------------------------------------------------------------------


# The routes are closures over the app's parts, as FastAPI factories write them; mccabe
# counts every route's branches into this one function, while each route stays small.
def create_app(  # noqa: C901
    settings: Settings,
    repository: ModelRepository,
    pipeline: RequestPipeline,
    calls: CallLog,
    tokens: TokenStore,
    oip: InferenceServicer,
    ready: Callable[[], bool],
) -> FastAPI:
    app = FastAPI(
        title="imgclf",
        version=__version__,
        description="Image classification and localization: the Open Inference Protocol "
        "v2 (KServe/Triton) and upload routes.",
    )
    front = HttpCalls(calls, tokens)

    def resolve(name: str, version: str, call: CallInfo) -> ModelVersion:
        entry = repository.resolve(name, version)
        call.model, call.version = entry.name, str(entry.version)
        return entry

    # --- health and metadata -----------------------------------------------------------

    @app.get("/v2/health/live", tags=["health"])
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"])
    async def ready_route() -> Response:
        ok = ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2", tags=["metadata"])
    async def server_metadata(request: Request) -> Response:
        async def run(call: CallInfo) -> Response:
            return JSONResponse(
                {"name": SERVER_NAME, "version": __version__, "extensions": HTTP_EXTENSIONS}
            )

        return await front.run("http:ServerMetadata", request, None, run)

    def metadata(entry: ModelVersion) -> dict[str, Any]:
        shapes = entry.runner.output_shapes if entry.runner else None
        versions = [str(e.version) for e in repository.ready_versions() if e.name == entry.name]
        return {
            "name": entry.name,
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [
                {"name": i.name, "datatype": i.datatype, "shape": list(i.shape)}
                for i in model_inputs(entry.spec)
            ],
            "outputs": [
                {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
                for o in model_outputs(entry.spec, shapes)
            ],
        }

    @app.get("/v2/models/{model}", tags=["metadata"])
    @app.get("/v2/models/{model}/versions/{version}", tags=["metadata"])
    async def model_metadata(request: Request, model: str, version: str = "") -> Response:
        async def run(call: CallInfo) -> Response:
            return JSONResponse(metadata(resolve(model, version, call)))

        return await front.run("http:ModelMetadata", request, model, run)

    @app.get("/v2/models/{model}/ready", tags=["health"])
    @app.get("/v2/models/{model}/versions/{version}/ready", tags=["health"])
    async def model_ready(request: Request, model: str, version: str = "") -> Response:
        async def run(call: CallInfo) -> Response:
            try:
                resolve(model, version, call)
            except ServiceError:
                return JSONResponse({"name": model, "ready": False}, status_code=503)
            return JSONResponse({"name": model, "ready": True})

        return await front.run("http:ModelReady", request, model, run)

    @app.get("/v2/models/{model}/config", tags=["metadata"])
    @app.get("/v2/models/{model}/versions/{version}/config", tags=["metadata"])
    async def model_config(request: Request, model: str, version: str = "") -> Response:
        async def run(call: CallInfo) -> Response:
            config = oip.model_config(resolve(model, version, call))
            as_json = MessageToDict(config, preserving_proto_field_name=True)
            return JSONResponse(_int64_fields(as_json))

        return await front.run("http:ModelConfig", request, model, run)

    # --- inference ---------------------------------------------------------------------

    @app.post("/v2/models/{model}/infer", tags=["inference"])
    @app.post("/v2/models/{model}/versions/{version}/infer", tags=["inference"])
    async def infer(request: Request, model: str, version: str = "") -> Response:
        async def run(call: CallInfo) -> Response:
            body = await request.body()
            header, binary = split_body(
                body, request.headers.get(HEADER_LENGTH), settings.max_json_depth
            )
            timeout = timeout_seconds(header)
            with repository.lease(model, version) as entry:
                call.model, call.version = entry.name, str(entry.version)
                spec = entry.spec
                requested, binary_outputs = requested_outputs(header)
                if not requested:
                    requested = default_outputs(spec)
                    if header.parameter("binary_data_output"):
                        binary_outputs = {o.name for o in requested}
                check_outputs(requested, spec)
                images = images_from(input_tensors(header, binary), spec)
                deadline = deadline_of(timeout)
                rows, geometries = await pipeline.run(entry, images, deadline, call, len(body))
            outputs = await asyncio.get_running_loop().run_in_executor(
                pipeline.pool, outputs_for, spec, rows, geometries, requested
            )
            request_id = "" if header.id is None else str(header.id)
            return infer_response(entry, request_id, outputs, binary_outputs)

        return await front.run("http:ModelInfer", request, model, run)

    # --- repository extension ----------------------------------------------------------

    @app.post("/v2/repository/index", tags=["repository"])
    async def repository_index(request: Request) -> Response:
        async def run(call: CallInfo) -> Response:
            body = await request.body()
            what = "the repository index request"
            only_ready = (
                bool(body)
                and validated(
                    IndexRequestBody, parse_json(body, settings.max_json_depth, what), what
                ).ready
            )
            states = {
                VersionState.READY: "READY",
                VersionState.LOADING: "LOADING",
                VersionState.FAILED: "UNAVAILABLE",
                VersionState.UNLOADING: "UNLOADING",
            }
            return JSONResponse(
                [
                    {
                        "name": e.name,
                        "version": str(e.version),
                        "state": states[e.state],
                        "reason": e.error or "",
                    }
                    for e in repository.all_versions()
                    if not only_ready or e.state is VersionState.READY
                ]
            )

        return await front.run("http:RepositoryIndex", request, None, run)

    @app.post("/v2/repository/models/{model}/load", tags=["repository"])
    async def load(request: Request, model: str) -> Response:
        async def run(call: CallInfo) -> Response:
            versions = await repository.load_model(model)
            call.model = calls.label_for(model)
            if not any(v.state is VersionState.READY for v in versions):
                errors = "; ".join(f"version {v.version}: {v.error}" for v in versions)
                raise UnavailableError(f"model {model!r} did not load: {errors}")
            return JSONResponse({})

        return await front.run("http:RepositoryModelLoad", request, None, run)

    @app.post("/v2/repository/models/{model}/unload", tags=["repository"])
    async def unload(request: Request, model: str) -> Response:
        async def run(call: CallInfo) -> Response:
            call.model = calls.label_for(model)
            await repository.unload_model(model)
            return JSONResponse({})

        return await front.run("http:RepositoryModelUnload", request, None, run)

    # --- upload routes -----------------------------------------------------------------

    @app.get("/v1/models", tags=["upload"])
    async def list_models(request: Request) -> Response:
        async def run(call: CallInfo) -> Response:
            models = []
            for entry in repository.all_versions():
                item: dict[str, Any] = {
                    "name": entry.name,
                    "version": str(entry.version),
                    "state": entry.state.value,
                    "error": entry.error or "",
                }
                if entry.runner is not None:
                    spec = entry.spec
                    item.update(
                        task=spec.task.value,
                        labels=spec.labels,
                        has_boxes=spec.has_boxes,
                        has_cam=spec.has_cam,
                    )
                models.append(item)
            return JSONResponse({"models": models})

        return await front.run("http:ListModels", request, None, run)

    async def uploaded_images(request: Request) -> list[bytes]:
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

    def top_k_of(request: Request, num_classes: int) -> int:
        text = request.query_params.get("top_k", "")
        if text and not text.isdigit():
            raise InvalidArgumentError(f"top_k must be a positive number, got {text!r}")
        return min(int(text) if text else settings.default_top_k, num_classes) or 1

    @app.post("/v1/models/{model}:classify", tags=["upload"])
    async def classify(request: Request, model: str) -> Response:
        async def run(call: CallInfo) -> Response:
            images = await uploaded_images(request)
            version = request.query_params.get("version", "")
            with repository.lease(model, version) as entry:
                call.model, call.version = entry.name, str(entry.version)
                spec = entry.spec
                k = top_k_of(request, spec.num_classes)
                size = sum(len(i) for i in images)
                rows, _ = await pipeline.run(entry, images, None, call, size)
            results = [
                {
                    "predictions": _predictions(
                        top_k(row[spec.outputs.probabilities], k, spec.labels)
                    )
                }
                for row in rows
            ]
            return JSONResponse(
                {"model": entry.name, "version": str(entry.version), "results": results}
            )

        return await front.run("http:Classify", request, model, run)

    @app.post("/v1/models/{model}:localize", tags=["upload"])
    async def localize(request: Request, model: str) -> Response:
        async def run(call: CallInfo) -> Response:
            images = await uploaded_images(request)
            version = request.query_params.get("version", "")
            with_heatmap = request.query_params.get("heatmap", "").lower() in ("1", "true")
            with repository.lease(model, version) as entry:
                call.model, call.version = entry.name, str(entry.version)
                spec = entry.spec
                check_can_localize(spec, entry.name, with_heatmap)
                k = top_k_of(request, spec.num_classes)
                size = sum(len(i) for i in images)
                rows, geometries = await pipeline.run(entry, images, None, call, size)
            items = await asyncio.get_running_loop().run_in_executor(
                pipeline.pool,
                localizations,
                spec,
                rows,
                geometries,
                k,
                with_heatmap,
                settings.heatmap_max_side,
            )
            results = []
            for item in items:
                answer: dict[str, Any] = {
                    "predictions": _predictions(item.predictions),
                    "box": {
                        "x_min": item.box.x_min,
                        "y_min": item.box.y_min,
                        "x_max": item.box.x_max,
                        "y_max": item.box.y_max,
                        "score": item.box.score,
                    },
                    "box_source": item.box_source,
                }
                if item.heatmap is not None:
                    answer["heatmap"] = {
                        "height": item.heatmap.height,
                        "width": item.heatmap.width,
                        "values": np.round(item.heatmap.values.astype(np.float64), 4).tolist(),
                    }
                results.append(answer)
            return JSONResponse(
                {"model": entry.name, "version": str(entry.version), "results": results}
            )

        return await front.run("http:Localize", request, model, run)

    # --- the page ----------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            return JSONResponse({"error": f"no static file {name!r}"}, status_code=404)
        return FileResponse(str(path))

    return app


# ModelConfig's int64 fields, which protobuf's JSON mapping writes as strings; Triton and
# the clients that read its config (perf_analyzer) expect numbers.
_INT64_FIELDS = {
    "dims",
    "shape",
    "preferred_batch_size",
    "max_queue_delay_microseconds",
    "versions",
    "num_versions",
}


def _int64_fields(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _int64_fields(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_int64_fields(v, key) for v in value]
    if key in _INT64_FIELDS and isinstance(value, str):
        return int(value)
    return value


def _predictions(items: Any) -> list[dict[str, Any]]:
    return [{"index": p.index, "label": p.label, "score": p.score} for p in items]


# --- the server --------------------------------------------------------------------------


class _EmbeddedServer(uvicorn.Server):
    """uvicorn in our event loop; signals are the gRPC server's to handle."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """The HTTP port: bound at creation (``port``), served by ``start()``."""

    def __init__(self, settings: Settings, app: FastAPI, reuse_port: bool = False):
        self.settings = settings
        host, port = settings.host, int(settings.http_port or 0)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # workers share the port; the kernel spreads connections
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.socket.bind((host, port))
        except OSError as exc:
            self.socket.close()
            raise OSError(f"cannot bind HTTP to {host}:{port}: {exc.strerror}") from None
        self.socket.listen(1024)
        self.port = int(self.socket.getsockname()[1])
        self.certificates: ServerCertificates | None = None
        self.ssl: ssl.SSLContext | None = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            self.certificates = ServerCertificates(
                settings.tls_cert, settings.tls_key, settings.tls_client_ca
            )
            self.ssl = self.certificates.ssl_context()
        config = uvicorn.Config(
            BodyLimit(app, settings.max_receive_message_bytes),
            lifespan="off",
            log_config=None,
            access_log=False,  # ours is in service.calls, one format for both ports
            timeout_graceful_shutdown=int(max(1, settings.grace_seconds)),
            server_header=False,
        )
        config.load()
        config.ssl = self.ssl  # our context, so the certificate can be reloaded in place
        self.server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None
        self._tls_watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self.server.serve(sockets=[self.socket]))
        if self.certificates is not None and self.ssl is not None:
            self._tls_watch = loop.create_task(self._watch_certificates())
        while not self.server.started and not self._task.done():
            await asyncio.sleep(0.01)

    async def _watch_certificates(self) -> None:
        assert self.certificates is not None and self.ssl is not None
        while True:
            await asyncio.sleep(TLS_RECHECK_SECONDS)
            self.certificates.refresh(self.ssl)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (``grace_seconds``), close."""
        if self._tls_watch is not None:
            self._tls_watch.cancel()
        self.server.should_exit = True
        if self._task is not None:
            await self._task
