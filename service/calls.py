"""One call's bookkeeping, whatever the front door: its request id, the labels its
metrics may carry, and its access-log line.

Only the names and versions of served models become label values (anything else is
``model="_unknown"``), so no client can grow the number of series. Every call gets a
request id — the caller's ``x-request-id``, cleaned and cut to 64 characters, or a new
one — which the answer carries and every error message names.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from service.config import Settings
from service.metrics import UNKNOWN_MODEL, Metrics

access_log = logging.getLogger("service.access")


@dataclass
class CallInfo:
    """What one call's metrics and access-log line say; only served names reach it."""

    model: str
    version: str = ""
    images: int = 0


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
