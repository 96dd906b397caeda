"""Errors that cross the mesh as gRPC status codes.

Service logic raises MeshError subclasses without knowing about gRPC contexts; the
`grpc_errors` decorator turns them into the matching status (with the offending request
field in trailing metadata), so the edge can map them to OpenAI errors.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

PARAM_METADATA_KEY = "sluice-error-param"
CODE_METADATA_KEY = "sluice-error-code"

F = TypeVar("F", bound=Callable[..., Any])


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


class ModelNotFound(MeshError):
    status = grpc.StatusCode.NOT_FOUND
    code = "model_not_found"


class ContextLengthExceeded(MeshError):
    status = grpc.StatusCode.OUT_OF_RANGE
    code = "context_length_exceeded"


class ResourceExhausted(MeshError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = "overloaded"


class DeadlineExceeded(MeshError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED
    code = "timeout"


def _abort(context: grpc.ServicerContext, err: MeshError) -> None:
    metadata = [(CODE_METADATA_KEY, err.code)]
    if err.param:
        metadata.append((PARAM_METADATA_KEY, err.param))
    context.set_trailing_metadata(tuple(metadata))
    context.abort(err.status, err.message)


def grpc_errors(method: F) -> F:
    """Servicer method decorator: MeshError → gRPC status. Works for unary and streaming handlers."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except MeshError as err:
                _abort(context, err)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except MeshError as err:
            _abort(context, err)

    return unary  # type: ignore[return-value]


def error_details(err: grpc.aio.AioRpcError | grpc.RpcError) -> tuple[str | None, str | None]:
    """(error code, param) a MeshError attached to a failed call, when it came from one."""
    values = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]
    return values.get(CODE_METADATA_KEY), values.get(PARAM_METADATA_KEY)
