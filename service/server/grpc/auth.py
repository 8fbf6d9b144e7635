"""The gRPC gate for tokens: every RPC but health needs an accepted token (the envelope,
``service.server.calls``, decides; health calls carry none: probes send no credentials).
Installed only when tokens are configured, so a server without them pays nothing per
call; a refused call's request body is never deserialised.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from service.server.auth import AUTH_HEADER

# Health needs no token: probes carry none, and these answers reveal nothing.
OPEN_METHODS = (
    "/grpc.health.v1.Health/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)


def header_of(metadata: Any) -> str | bytes | None:
    for key, value in metadata or ():
        if key == AUTH_HEADER:
            return value  # type: ignore[no-any-return]
    return None


# (full method name, context) → sets the UNAUTHENTICATED status on the context
Refused = Callable[[str, Any], Awaitable[None]]


def _refusing(handler: grpc.RpcMethodHandler, refuse: Refused, method: str) -> Any:
    """A handler of the same shape as ``handler`` that refuses the call."""

    async def unary(request: Any, context: Any) -> Any:
        await refuse(method, context)
        return None

    async def streaming(request: Any, context: Any) -> Any:
        await refuse(method, context)
        if False:  # an async generator that yields nothing: the stream ends with the status
            yield

    # Request bodies are not deserialised: a refused call costs nothing more.
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.stream_stream_rpc_method_handler(streaming)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call but health that has no accepted token."""

    def __init__(self, authorized: Callable[[str | bytes | None], bool], refuse: Refused):
        self.authorized = authorized
        self.refuse = refuse

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_METHODS) or self.authorized(
            header_of(handler_call_details.invocation_metadata)
        ):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: UNIMPLEMENTED, as without a token
            return handler
        return _refusing(handler, self.refuse, method)
