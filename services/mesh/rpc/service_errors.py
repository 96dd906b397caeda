"""The ServiceErrors interceptor, on every (asyncio) server: a handler's MeshError becomes its
gRPC status with the error code (and the offending request field) in trailing metadata. Any
other exception a handler raises is that request's crash: it is logged with its traceback and
answered as INTERNAL with a stable message, never with the exception's own text.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc
import grpc.aio

from services.mesh.contracts.errors import MeshError
from services.mesh.rpc.faults import CODE_METADATA_KEY, PARAM_METADATA_KEY
from services.mesh.rpc.handlers import Behavior, UnaryRequestInterceptor, wrap_behavior

log = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext, err: MeshError) -> None:
    metadata = [(CODE_METADATA_KEY, err.code)]
    if err.param:
        metadata.append((PARAM_METADATA_KEY, err.param))
    context.set_trailing_metadata(tuple(metadata))
    await context.abort(err.status, err.message)


class ServiceErrors(UnaryRequestInterceptor):
    """MeshError → its status; any other exception → INTERNAL with a stable message. For every
    handler of a server, unary and streaming alike."""

    def __init__(self, service: str) -> None:
        self._crashed = MeshError(f"internal error in {service} while handling this request")

    def intercept(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return wrap_behavior(
            handler,
            lambda behavior: self._unary(behavior, details.method),
            lambda behavior: self._streaming(behavior, details.method),
        )

    async def _fail(self, context: grpc.aio.ServicerContext, err: Exception, method: str) -> None:
        if context.code() is not None:
            raise err  # the handler aborted the call itself: grpc's own way out
        if isinstance(err, MeshError):
            await _abort(context, err)
        log.exception("%s crashed", method)
        await _abort(context, self._crashed)

    def _unary(self, behavior: Behavior, method: str) -> Behavior:
        async def answered(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(request, context)
            except Exception as err:
                await self._fail(context, err, method)

        return answered

    def _streaming(self, behavior: Behavior, method: str) -> Behavior:
        async def answered(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async with aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            except Exception as err:
                await self._fail(context, err, method)

        return answered
