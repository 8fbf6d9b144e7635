"""The call envelope's gRPC side (``service.server.calls.CallEnvelope`` is the envelope):
reads the request id and peer off the call, and writes the outcome back as status,
details and trailers. Every gRPC method of ours runs in it, classifier.v1 and the Open
Inference Protocol alike:

    return await envelope.run("Classify", context, handler, request.model)

Errors end the call through ``fail`` rather than ``context.abort()``: abort works by
raising, and its exception's traceback holds the handler's frames — and with them the
request message, up to 64 MB — in a reference cycle that only a full garbage collection
frees.
"""

from __future__ import annotations

from typing import Any

import grpc

from service.model.errors import REASON_KEY, REQUEST_ID_KEY
from service.server.calls import CallEnvelope, Handler, Outcome


def fail(context: Any, outcome: Outcome) -> None:
    """End the call with the outcome's error status, without ``context.abort()``."""
    context.set_code(outcome.code)
    context.set_details(f"{outcome.message} (request id {outcome.request_id})")
    context.set_trailing_metadata(
        ((REQUEST_ID_KEY, outcome.request_id), (REASON_KEY, outcome.reason))
    )


def metadata_value(context: Any, key: str) -> str | bytes | None:
    for k, value in context.invocation_metadata() or ():
        if k == key:
            return value  # type: ignore[no-any-return]
    return None


class GrpcEnvelope:
    def __init__(self, envelope: CallEnvelope):
        self.envelope = envelope

    async def run(
        self, method: str, context: Any, handler: Handler, model: str | None = None
    ) -> Any:
        """The handler's answer, or None with the error status set on ``context``."""

        def cancelled() -> grpc.StatusCode:
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

        outcome = await self.envelope.run(
            method,
            handler,
            given_id=metadata_value(context, REQUEST_ID_KEY),
            peer=context.peer(),
            model=model,
            cancelled=cancelled,
            carrier=lambda: dict(context.invocation_metadata() or ()),
        )
        if outcome.ok:
            context.set_trailing_metadata(((REQUEST_ID_KEY, outcome.request_id),))
            return outcome.answer
        fail(context, outcome)
        return None

    async def run_for_stream(
        self, method: str, context: Any, handler: Handler, model: str | None, given_id: str
    ) -> Outcome:
        """One request of a stream: its outcome, for the stream's own answer (the
        request's ``id`` is its request id; the stream's status is left alone)."""
        return await self.envelope.run(
            method,
            handler,
            given_id=given_id or metadata_value(context, REQUEST_ID_KEY),
            peer=context.peer(),
            model=model,
            carrier=lambda: dict(context.invocation_metadata() or ()),
        )

    async def refuse_unauthenticated(self, full_method: str, context: Any) -> None:
        """The auth gate's answer to a call without an accepted token."""
        method = full_method.rsplit("/", 1)[-1]
        given = metadata_value(context, REQUEST_ID_KEY)
        fail(context, self.envelope.refuse(method, given, context.peer(), "metadata"))
