"""Errors that cross the mesh as gRPC status codes, and who is to blame for a failed call.

Service logic raises MeshError subclasses without knowing about gRPC contexts; the
`ServiceErrors` interceptor, on every (asyncio) server, turns them into the matching status with the
error code (and the offending request field) in trailing metadata. Any other exception a
handler raises is that request's crash: it is logged with its traceback and answered as
INTERNAL with a stable message, never with the exception's own text.

So a caller can tell the two kinds of failure apart: a status that carries the error-code
metadata is the service's answer about this request; one without it (UNAVAILABLE, a dropped
connection) came from the transport and says something about the instance. Only that kind,
and deadlines, count toward ejecting an instance.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc
import grpc.aio

from services.mesh.handlers import Behavior, UnaryRequestInterceptor, wrap_behavior

log = logging.getLogger(__name__)

PARAM_METADATA_KEY = "sluice-error-param"
CODE_METADATA_KEY = "sluice-error-code"

# An instance that cannot be reached or does not answer in time, whoever reports it.
UNRESPONSIVE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# What the transport reports when a connection breaks mid-call (e.g. "Stream removed"); a
# service's own crash on a request arrives as INTERNAL too, but with the error-code metadata.
BROKEN = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


class MeshError(Exception):
    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    code: str = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidArgument(MeshError):
    status = grpc.StatusCode.INVALID_ARGUMENT
    code = "invalid_value"


class NotFound(MeshError):
    status = grpc.StatusCode.NOT_FOUND
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


def check_model(requested: str, served: str) -> None:
    """A call names the model this instance serves (or none: whatever it serves)."""
    if requested and requested != served:
        raise ModelNotFound(f"the model `{requested}` is not served here; this instance serves `{served}`", "model")


class WrongModelKind(MeshError):
    status = grpc.StatusCode.FAILED_PRECONDITION
    code = "wrong_model_kind"


class ContextLengthExceeded(MeshError):
    status = grpc.StatusCode.OUT_OF_RANGE
    code = "context_length_exceeded"


class ResourceExhausted(MeshError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = "overloaded"


class DeadlineExceeded(MeshError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED
    code = "timeout"


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


def error_details(err: grpc.RpcError) -> tuple[str | None, str | None]:
    """(error code, param) a service attached to a failed call; (None, None) when the failure
    did not come from a service's answer."""
    values = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]
    return values.get(CODE_METADATA_KEY), values.get(PARAM_METADATA_KEY)


def is_instance_fault(err: grpc.RpcError) -> bool:
    """Does this failure say something about the instance (down, hung, unreachable) rather than
    about the request? Only those count toward ejecting it."""
    code = err.code()  # type: ignore[attr-defined]
    return code in UNRESPONSIVE or (code in BROKEN and error_details(err)[0] is None)
