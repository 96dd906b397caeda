"""OpenAI-shaped errors: what leaves the edge when a request fails, with the matching HTTP status."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc
import grpc.aio
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from services.edge_http.metrics import UPSTREAM_ERRORS
from services.edge_http.openai_schema import ErrorBody, ErrorDetail
from services.mesh.errors import error_details

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1

# gRPC status → (HTTP status, OpenAI error type)
_STATUS_MAP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (503, "service_unavailable"),
}
# A failure no service answered for (the transport's): the client sees what it means, not grpc's text.
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


@dataclass
class OpenAIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> ErrorBody:
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def from_rpc_error(err: grpc.aio.AioRpcError, upstream: str) -> OpenAIError:
    UPSTREAM_ERRORS.labels(upstream, err.code().name).inc()
    code, param = error_details(err)
    status, kind = _STATUS_MAP.get(err.code(), (500, "server_error"))
    message = err.details() or err.code().name
    if code is None and err.code() in _TRANSPORT:
        # Not a service's answer: the connection failed, broke or timed out. grpc's text (socket
        # errors, "Stream removed", addresses) is for the operator's log, not for clients.
        log.warning("%s call failed: %s %s", upstream, err.code().name, err.details())
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            status, kind = 503, "service_unavailable"
        message = _TRANSPORT_MESSAGES.get(err.code(), _TRANSPORT_MESSAGE).format(upstream)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else {}
    return OpenAIError(status, message, kind, param, code or err.code().name.lower(), headers)


def _field(loc: tuple[str | int, ...]) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(exc: RequestValidationError) -> OpenAIError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return OpenAIError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    name = _field(tuple(first.get("loc", ())))
    if not name and first.get("type") == "value_error":
        # A check across fields (a model validator) says which field it is about: "field: why".
        text = str(first.get("msg", "")).removeprefix("Value error, ")
        field, sep, _ = text.partition(": ")
        return OpenAIError(400, text, param=field if sep and " " not in field else None, code="invalid_value")
    if not name:
        return OpenAIError(400, f"the request body must be a JSON object: {first.get('msg')}", code="invalid_body")
    # Union types produce one error per alternative; the first names the field well enough.
    return OpenAIError(400, f"{name}: {first.get('msg')}", param=name, code="invalid_value")


async def handle_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error(exc).response()


async def handle_openai_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return exc.response()
