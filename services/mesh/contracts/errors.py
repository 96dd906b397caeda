"""The kinds of error a service answers a request with: each carries the gRPC status it crosses the
mesh as and a stable error code (with the request field at fault, when there is one).

Service logic raises them without knowing about gRPC contexts; the ServiceErrors interceptor
(rpc/service_errors.py) puts them on the wire, and callers read them back (rpc/faults.py).
"""

from __future__ import annotations

import grpc


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


class Unavailable(MeshError):
    """What this instance needs (a worker it drives) is down: the caller tries another instance."""

    status = grpc.StatusCode.UNAVAILABLE
    code = "unavailable"


class DeadlineExceeded(MeshError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED
    code = "timeout"
