"""OpenAI-shaped errors: what leaves the HTTP front end when a request fails, with the matching
HTTP status. The core's failures are mapped here, once; what only HTTP can refuse (a body too
large, headers too long, malformed JSON) is answered here directly."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from services.edge_http.core.failures import EdgeError, Failure
from services.edge_http.openai_schema import ErrorBody, ErrorDetail

# Each kind of failure → (HTTP status, OpenAI error type), as OpenAI answers them.
_HTTP: dict[Failure, tuple[int, str]] = {
    Failure.INVALID: (400, "invalid_request_error"),
    Failure.UNAUTHENTICATED: (401, "authentication_error"),
    Failure.PERMISSION_DENIED: (403, "permission_error"),
    Failure.NOT_FOUND: (404, "invalid_request_error"),
    Failure.RATE_LIMITED: (429, "rate_limit_error"),
    Failure.INTERNAL: (500, "server_error"),
    Failure.BROKEN: (502, "server_error"),
    Failure.UNAVAILABLE: (503, "service_unavailable"),
    Failure.TIMEOUT: (504, "timeout"),
}


@dataclass
class OpenAIError:
    """An error as the HTTP front end answers it."""

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


def openai_error(err: EdgeError) -> OpenAIError:
    status, kind = _HTTP[err.kind]
    headers = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(err.retry_after_s)
    if err.kind is Failure.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return OpenAIError(status, err.message, kind, err.param, err.code, headers)


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


async def handle_edge_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EdgeError)
    return openai_error(exc).response()
