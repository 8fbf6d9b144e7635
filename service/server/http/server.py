"""The HTTP port's server: uvicorn in the gRPC server's process and event loop, on a
socket we bind (port 0 picks a free one; workers share it with SO_REUSEPORT), with TLS
from the same files as the gRPC port (reloaded in place when they change) and a body
limit. Shutdown is ours: during the drain /v2/health/ready says 503 while requests are
still served, then the socket closes and in-flight requests get the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.model.errors import REASON_KEY, LimitExceededError
from service.server.config import Settings
from service.server.tls import ServerCertificates

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
            access_log=False,  # ours is in service.server.calls, one format for both ports
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
