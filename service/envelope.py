"""The envelope every gRPC method of ours runs in: request id, error → status, trailers,
metrics and the access log — for classifier.v1 and the Open Inference Protocol alike.

    return await envelope.run("Classify", request, context, handler)

``handler(request, context, call)`` returns the response or raises a ServiceError; it
fills ``call`` (model, version, images) once it knows them. Errors end the call through
``fail`` rather than ``context.abort()``: abort works by raising, and its exception's
traceback holds the handler's frames — and with them the request message, up to 64 MB —
in a reference cycle that only a full garbage collection frees.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from service.auth import REFUSAL
from service.calls import CallInfo, CallLog
from service.metrics import UNKNOWN_MODEL
from service.model.errors import REASON_KEY, REQUEST_ID_KEY, ServiceError
from service.status import drop_references, reason, status_code

log = logging.getLogger(__name__)

Handler = Callable[[Any, Any, CallInfo], Awaitable[Any]]


def fail(context: Any, code: grpc.StatusCode, details: str, request_id: str, why: str) -> None:
    """End the call with an error status, without ``context.abort()`` (see above)."""
    context.set_code(code)
    context.set_details(details)
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id), (REASON_KEY, why)))


def metadata_value(context: Any, key: str) -> str | bytes | None:
    for k, value in context.invocation_metadata() or ():
        if k == key:
            return value  # type: ignore[no-any-return]
    return None


class Envelope:
    def __init__(self, calls: CallLog):
        self.calls = calls

    async def run(
        self,
        method: str,
        request: Any,
        context: Any,
        handler: Handler,
        model: str | None = None,
    ) -> Any:
        """Run ``handler``; ``model`` is the name the request gives (None: it names none)."""
        started = time.perf_counter()
        request_id = self.calls.request_id(metadata_value(context, REQUEST_ID_KEY))
        call = CallInfo(self.calls.label_for(model))
        code = grpc.StatusCode.OK
        message = why = ""
        try:
            response = await handler(request, context, call)
        except ServiceError as exc:
            code, message, why = status_code(exc), exc.message, reason(exc)
            drop_references(exc)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("request %s %s failed unexpectedly", request_id, method)
            code, message, why = grpc.StatusCode.INTERNAL, "internal error", "internal"
        finally:
            self.calls.account(
                method,
                call,
                code.name,
                time.perf_counter() - started,
                request_id,
                context.peer(),
                message,
            )
        if code is grpc.StatusCode.OK:
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            return response
        fail(context, code, f"{message} (request id {request_id})", request_id, why)
        return None

    async def refuse_unauthenticated(self, full_method: str, context: Any) -> None:
        """The auth gate's answer to a call without an accepted token (counted, logged)."""
        method = full_method.rsplit("/", 1)[-1]
        request_id = self.calls.request_id(metadata_value(context, REQUEST_ID_KEY))
        self.calls.account(
            method,
            CallInfo(UNKNOWN_MODEL),
            grpc.StatusCode.UNAUTHENTICATED.name,
            0.0,
            request_id,
            context.peer(),
            "missing or wrong token",
        )
        fail(
            context,
            grpc.StatusCode.UNAUTHENTICATED,
            f"{REFUSAL} (request id {request_id})",
            request_id,
            "unauthenticated",
        )
