"""The call envelope's HTTP side (``service.server.calls.CallEnvelope`` is the envelope):
reads the request id, token and peer off the request, and writes the outcome back — the
answer, or ``{"error": "... (request id ...)"}`` with the HTTP status of the matching gRPC
code and a ``classifier-error-reason`` header; an ``x-request-id`` header either way.

Routes reach the server's parts through ``parts(request)`` (set on the app by
``service.server.http.app.create_app``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from service.model.errors import REASON_KEY, REQUEST_ID_KEY
from service.server.auth import AUTH_HEADER
from service.server.calls import CallEnvelope, CallInfo
from service.server.config import Settings
from service.server.dataplane import DataPlane
from service.server.status import http_status

Route = Callable[[CallInfo], Awaitable[Response]]


class HttpEnvelope:
    def __init__(self, envelope: CallEnvelope):
        self.envelope = envelope

    async def run(self, method: str, request: Request, model: str | None, route: Route) -> Response:
        """``route``'s response, or the error response; ``model``: the name the path gives."""
        peer = f"ipv4:{request.client.host}:{request.client.port}" if request.client else ""
        given_id = request.headers.get(REQUEST_ID_KEY)
        if self.envelope.authorized(request.headers.get(AUTH_HEADER)):
            outcome = await self.envelope.run(
                method,
                route,
                given_id=given_id,
                peer=peer,
                model=model,
                carrier=lambda: request.headers,
            )
        else:
            outcome = self.envelope.refuse(method, given_id, peer, "header")
        response: Response = (
            outcome.answer
            if outcome.ok
            else JSONResponse(
                {"error": f"{outcome.message} (request id {outcome.request_id})"},
                status_code=http_status(outcome.code),
                headers={REASON_KEY: outcome.reason},
            )
        )
        response.headers[REQUEST_ID_KEY] = outcome.request_id
        return response


@dataclass(frozen=True)
class Parts:
    """What every route needs: settings, the data plane and the envelope."""

    settings: Settings
    plane: DataPlane
    envelope: HttpEnvelope


def parts(request: Request) -> Parts:
    return request.app.state.parts  # type: ignore[no-any-return]


async def respond(
    request: Request, method: str, model: str | None, build: Callable[[CallInfo], Response]
) -> Response:
    """A route that answers without waiting on anything, run in the envelope."""

    async def route(call: CallInfo) -> Response:
        return build(call)

    return await parts(request).envelope.run(method, request, model, route)
