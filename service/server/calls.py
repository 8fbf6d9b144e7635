"""One call's envelope, whatever the front door: its request id, the token check, the
error → status and reason, the labels its metrics may carry, and its access-log line.

    outcome = await envelope.run("Classify", handler, given_id=..., peer=..., model=...)

``handler(call)`` returns the answer or raises a ServiceError; it fills ``call`` (model,
version, images) once it knows them. The transports' adapters (``grpc.envelope``,
``http.envelope``) only read their request id, token and peer off the wire and write the
``Outcome`` back onto it: status and details with trailers for gRPC, a JSON error with
headers for HTTP.

Only the names and versions of served models become label values (anything else is
``model="_unknown"``), so no client can grow the number of series. Every call gets a
request id — the caller's ``x-request-id``, cleaned and cut to 64 characters, or a new
one — which the answer carries and every error message names.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from service.model.errors import ServiceError
from service.server.auth import TokenStore
from service.server.config import Settings
from service.server.metrics import UNKNOWN_MODEL, Metrics
from service.server.statistics import Stages, record_request
from service.server.status import drop_references, reason, status_code
from service.server.tracing import Tracing
from service.server.tracing import current as current_tracing

log = logging.getLogger(__name__)

access_log = logging.getLogger("service.access")


@dataclass
class CallInfo:
    """What one call's metrics and access-log line say; only served names reach it."""

    model: str
    version: str = ""
    images: int = 0
    # Set once an inference call holds its model version: its stages, for the
    # statistics extension (a call that fails before that counts for no version).
    stages: Stages | None = None


class CallLog:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        is_served: Callable[[str], bool] | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self._is_served = is_served
        self._id_prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count(1)

    def request_id(self, given: str | bytes | None) -> str:
        if given:
            text = given if isinstance(given, str) else bytes(given).decode("ascii", "replace")
            cleaned = "".join(c for c in text[:64] if c.isprintable())
            if cleaned:
                return cleaned
        # Unique per process and cheap (uuid4 reads the OS entropy pool on every call).
        return f"{self._id_prefix}-{next(self._ids):x}"

    def label_for(self, name: str | None) -> str:
        """The model label of a call naming ``name`` before it is resolved."""
        if name is None:
            return ""  # a call that names no model (ListModels, server metadata)
        served = self._is_served
        return name if name and served is not None and served(name) else UNKNOWN_MODEL

    def account(
        self,
        method: str,
        call: CallInfo,
        code: str,
        seconds: float,
        request_id: str,
        peer: str,
        message: str = "",
    ) -> None:
        """Metrics and the access-log line of one finished call (``code``: the gRPC
        status name, also for HTTP calls, so one dashboard covers both)."""
        m = self.metrics
        m.child(m.requests, call.model, call.version, method, code).inc()
        m.child(m.request_duration, call.model, method).observe(seconds)
        if call.stages is not None:
            record_request(m, call.model, call.version, call.stages, code == "OK", seconds)
        if self.settings.access_log and access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s %s",
                method,
                code,
                extra={
                    "request_id": request_id,
                    "method": method,
                    "model": call.model,
                    "version": call.version,
                    "images": call.images,
                    "code": code,
                    "ms": round(seconds * 1000, 2),
                    "peer": peer,
                    "error": message or None,
                },
            )


@dataclass
class Outcome:
    """How a call ended: the handler's answer, or the error status, message and reason."""

    request_id: str
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    reason: str = ""
    answer: Any = None

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK


Handler = Callable[[CallInfo], Awaitable[Any]]


class CallEnvelope:
    """Runs every call of both transports: one request id, token check, error table,
    metrics and access log."""

    def __init__(self, calls: CallLog, tokens: TokenStore):
        self.calls = calls
        self.tokens = tokens

    def authorized(self, header: str | bytes | None) -> bool:
        """Whether a call with this ``authorization`` value may run (always, without tokens)."""
        return not self.tokens.enabled or self.tokens.accepts(header)

    def refuse(self, method: str, given_id: str | bytes | None, peer: str, where: str) -> Outcome:
        """A call without an accepted token: UNAUTHENTICATED, counted and logged
        (``where``: how the caller sends the token, "metadata" or "header")."""
        outcome = Outcome(
            self.calls.request_id(given_id),
            grpc.StatusCode.UNAUTHENTICATED,
            f"missing or wrong token: send {where} 'authorization: Bearer <token>'",
            "unauthenticated",
        )
        self._account(method, CallInfo(UNKNOWN_MODEL), outcome, 0.0, peer)
        return outcome

    async def run(
        self,
        method: str,
        handler: Handler,
        *,
        given_id: str | bytes | None,
        peer: str,
        model: str | None,
        cancelled: Callable[[], grpc.StatusCode] = lambda: grpc.StatusCode.CANCELLED,
        carrier: Callable[[], Mapping[str, str]] | None = None,
    ) -> Outcome:
        """Run ``handler``; ``model`` is the name the request gives (None: it names none);
        ``cancelled`` tells a cancelled call's status (a deadline, or the caller gone);
        ``carrier`` gives the call's headers or metadata, read for a ``traceparent`` only
        when tracing is on."""
        started = time.monotonic()
        outcome = Outcome(self.calls.request_id(given_id))
        call = CallInfo(self.calls.label_for(model))
        try:
            outcome.answer = await handler(call)
        except ServiceError as exc:
            outcome.code, outcome.message, outcome.reason = (
                status_code(exc),
                exc.message,
                reason(exc),
            )
            drop_references(exc)
        except asyncio.CancelledError:
            outcome.code = cancelled()
            raise
        except Exception:
            log.exception("request %s %s failed unexpectedly", outcome.request_id, method)
            outcome.code, outcome.message, outcome.reason = (
                grpc.StatusCode.INTERNAL,
                "internal error",
                "internal",
            )
        finally:
            ended = time.monotonic()
            self._account(method, call, outcome, ended - started, peer)
            tracing = current_tracing()
            if tracing is not None:
                self._trace(tracing, method, carrier, started, ended, call, outcome)
        return outcome

    @staticmethod
    def _trace(
        tracing: Tracing,
        method: str,
        carrier: Callable[[], Mapping[str, str]] | None,
        started: float,
        ended: float,
        call: CallInfo,
        outcome: Outcome,
    ) -> None:
        """The call's spans; a failure here is logged, never the call's."""
        try:
            tracing.record_call(
                method,
                carrier,
                started,
                ended,
                {
                    "rpc.method": method,
                    "imgclf.model": call.model,
                    "imgclf.version": call.version,
                    "imgclf.images": call.images,
                    "imgclf.request_id": outcome.request_id,
                    "imgclf.code": outcome.code.name,
                },
                outcome.ok,
                outcome.message,
                call.stages,
            )
        except Exception:
            log.exception("tracing call %s failed", outcome.request_id)

    def _account(
        self, method: str, call: CallInfo, outcome: Outcome, seconds: float, peer: str
    ) -> None:
        self.calls.account(
            method,
            call,
            outcome.code.name,
            seconds,
            outcome.request_id,
            peer,
            outcome.message,
        )
