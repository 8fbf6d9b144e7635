"""Structured logging: one line per event, JSON by default, extra fields included."""

from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


# One encoder for every line (``json.dumps`` with an argument builds a new one each call).
_ENCODER = json.JSONEncoder(default=str)

# Set in a worker process (service.server.workers): every line says which worker wrote it.
_worker: int | None = None


def set_worker(index: int) -> None:
    global _worker
    _worker = index


class JsonFormatter(logging.Formatter):
    """One JSON object per record. The access log writes a line per call, so this is on
    the request path: the timestamp's date part is formatted once per second, and the
    ``extra=`` fields are found by a set difference rather than a scan."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def _timestamp(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:  # races between threads only recompute the same value
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int(msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "ts": self._timestamp(record.created, record.msecs),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if _worker is not None:
            event["worker"] = _worker
        fields = record.__dict__
        for key in fields.keys() - _STANDARD:
            if not key.startswith("_"):
                event[key] = fields[key]
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(event)


def configure(level: str = "INFO", fmt: str = "json") -> None:
    # Neither format shows the caller's file, line, thread or process, so the records need
    # not collect them: finding the caller walks the stack on every call (the logging
    # HOWTO's "Optimization" section names these switches).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
