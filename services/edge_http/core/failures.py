"""How a request fails at the edge, for any front end: a kind of failure, a message for the
caller, the field at fault, a stable code, and how long to wait before retrying.

The core raises EdgeError; each front end maps the kind once to its own terms (HTTP status and
OpenAI error type in http_api/errors.py). Failures of calls into the mesh arrive as gRPC
statuses and become EdgeErrors here (`from_rpc_error`), so a service's error reaches the caller
with the same meaning whichever front end it came through.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import grpc
import grpc.aio

from services.edge_http.core.metrics import UPSTREAM_ERRORS
from services.mesh.contracts.retry import RETRY_AFTER_S
from services.mesh.rpc.faults import error_details

log = logging.getLogger(__name__)


class Failure(enum.Enum):
    INVALID = "invalid"  # the request cannot be served as it is (a field is wrong)
    UNAUTHENTICATED = "unauthenticated"  # no credential, or one that is not valid
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"  # a model, a version
    RATE_LIMITED = "rate_limited"  # the caller's limits, or a service's queue: retry later
    UNAVAILABLE = "unavailable"  # no instance can serve it now: retry later
    TIMEOUT = "timeout"  # the mesh did not answer within its deadline
    BROKEN = "broken"  # a service answered wrongly (a stream without its end)
    INTERNAL = "internal"  # the edge itself failed


# Kinds whose caller should come back: they always say when.
_RETRYABLE = frozenset({Failure.RATE_LIMITED, Failure.UNAVAILABLE})


@dataclass
class EdgeError(Exception):
    kind: Failure
    message: str
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None

    def __post_init__(self) -> None:
        if self.kind in _RETRYABLE and self.retry_after_s is None:
            self.retry_after_s = RETRY_AFTER_S
        super().__init__(self.message)


def unavailable(message: str) -> EdgeError:
    return EdgeError(Failure.UNAVAILABLE, message, code="unavailable")


# gRPC status → what it means for the request.
_KINDS: dict[grpc.StatusCode, Failure] = {
    grpc.StatusCode.INVALID_ARGUMENT: Failure.INVALID,
    grpc.StatusCode.OUT_OF_RANGE: Failure.INVALID,
    grpc.StatusCode.FAILED_PRECONDITION: Failure.INVALID,
    grpc.StatusCode.NOT_FOUND: Failure.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: Failure.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: Failure.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Failure.RATE_LIMITED,
    grpc.StatusCode.UNAVAILABLE: Failure.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Failure.TIMEOUT,
    grpc.StatusCode.CANCELLED: Failure.UNAVAILABLE,
}
# A failure no service answered for (the transport's): the caller sees what it means, not grpc's text.
_TRANSPORT_MESSAGES = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "{} did not answer within the deadline",
    grpc.StatusCode.CANCELLED: "{} stopped handling the request; retry shortly",
}
_TRANSPORT_MESSAGE = "{} is unavailable; retry shortly"
_TRANSPORT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


def from_rpc_error(err: grpc.aio.AioRpcError, upstream: str) -> EdgeError:
    UPSTREAM_ERRORS.labels(upstream, err.code().name).inc()
    code, param = error_details(err)
    kind = _KINDS.get(err.code(), Failure.INTERNAL)
    message = err.details() or err.code().name
    if code is None and err.code() in _TRANSPORT:
        # Not a service's answer: the connection failed, broke or timed out. grpc's text (socket
        # errors, "Stream removed", addresses) is for the operator's log, not for callers.
        log.warning("%s call failed: %s %s", upstream, err.code().name, err.details())
        kind = Failure.TIMEOUT if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED else Failure.UNAVAILABLE
        message = _TRANSPORT_MESSAGES.get(err.code(), _TRANSPORT_MESSAGE).format(upstream)
    return EdgeError(kind, message, param, code or err.code().name.lower())
