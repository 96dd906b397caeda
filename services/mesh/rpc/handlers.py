"""Rewrapping an asyncio gRPC method handler's behavior, whatever its streaming kind (for interceptors).

Every mesh server is a `grpc.aio` server. Its handlers are async generators (a stream of replies
yielded) or coroutines (one reply returned, or a stream written with `context.write`, as
grpc.health.v1's Watch does); a wrapper must be of the same kind as what it wraps, which is how
grpc tells a generator's replies from a coroutine's (and a plain function would run on a thread).
A streaming wrapper closes what it wraps when it is closed itself (`aclosing`), so a client that
goes away reaches the handler's own cleanup at once, through every layer.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc
import grpc.aio

Behavior = Callable[..., Any]
Wrap = Callable[[Behavior], Behavior]
Check = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]


def behavior_kind(handler: grpc.RpcMethodHandler) -> str:
    """The handler field holding its behavior: unary_unary, unary_stream, stream_unary or stream_stream."""
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


def wrap_behavior(
    handler: grpc.RpcMethodHandler, unary: Wrap, streaming: Wrap, **fields: object
) -> grpc.RpcMethodHandler:
    """The same handler with its behavior wrapped by `streaming` (an async generator function around
    one) or `unary` (a coroutine function around one), and any other fields replaced."""
    kind = behavior_kind(handler)
    behavior = getattr(handler, kind)
    wrap = streaming if inspect.isasyncgenfunction(behavior) else unary
    return handler._replace(**{kind: wrap(behavior)}, **fields)


def guard_behavior(handler: grpc.RpcMethodHandler, check: Check, **fields: object) -> grpc.RpcMethodHandler:
    """The same handler, run only once `check(request, context)` returned (it aborts the call to refuse it)."""

    def unary(behavior: Behavior) -> Behavior:
        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(request, context)
            return await behavior(request, context)

        return checked

    def streaming(behavior: Behavior) -> Behavior:
        async def checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(request, context)
            async with aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response

        return checked

    return wrap_behavior(handler, unary, streaming, **fields)


class UnaryRequestInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor of the calls that send one request (unary and server-streaming), which are
    all of Sluice's own; client-streaming ones (server reflection) pass untouched."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        return self.intercept(handler, details)

    def intercept(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        raise NotImplementedError
