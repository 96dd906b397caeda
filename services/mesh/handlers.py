"""Rewrapping a gRPC method handler's behavior, whatever its streaming kind (for interceptors)."""

from __future__ import annotations

from collections.abc import Callable

import grpc

Behavior = Callable


def behavior_kind(handler: grpc.RpcMethodHandler) -> str:
    """The handler field holding its behavior: unary_unary, unary_stream, stream_unary or stream_stream."""
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


def wrap_behavior(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior], Behavior], **fields: object
) -> grpc.RpcMethodHandler:
    """The same handler with its behavior wrapped (and any other fields replaced)."""
    kind = behavior_kind(handler)
    return handler._replace(**{kind: wrap(getattr(handler, kind))}, **fields)


class UnaryRequestInterceptor(grpc.ServerInterceptor):
    """An interceptor of the calls that send one request (unary and server-streaming), which are
    all of Sluice's own; client-streaming ones (server reflection) pass untouched."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        return self.intercept(handler, details)

    def intercept(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        raise NotImplementedError
