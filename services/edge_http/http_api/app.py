"""The HTTP front end's ASGI application: its endpoints (http_api/endpoints/), error handlers,
middleware, the edge core it holds for its lifetime, and the OpenAPI document."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from services.edge_http.core.edge import EdgeCore
from services.edge_http.core.failures import EdgeError
from services.edge_http.http_api.endpoints import completions, embeddings, status
from services.edge_http.http_api.errors import OpenAIError, handle_edge_error, handle_validation_error
from services.edge_http.http_api.intake import LimitRequest, Rejected
from services.edge_http.http_api.observe import ObserveRequests, request_id
from services.mesh.config import Settings
from services.mesh.telemetry import shutdown_tracing, tracing_enabled

log = logging.getLogger(__name__)


class NormalizeSlashes:
    """Collapse repeated slashes so a base URL typed as `…/v1/` still reaches `/v1/chat/completions`."""

    _REPEATED = re.compile(r"/{2,}")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "//" in scope["path"]:
            scope = {**scope, "path": self._REPEATED.sub("/", scope["path"])}
        await self.app(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        core = EdgeCore(settings)
        app.state.core = core
        yield
        await core.close()
        # Here, not after uvicorn returns: uvicorn re-raises the SIGTERM it caught once it is done.
        shutdown_tracing()

    app = FastAPI(
        title="Sluice OpenAI-compatible API",
        version="1",
        lifespan=lifespan,
        exception_handlers={
            RequestValidationError: handle_validation_error,
            EdgeError: handle_edge_error,
            HTTPException: _http_exception,
            Exception: _unexpected,
        },
    )
    app.add_middleware(LimitRequest, max_bytes=settings.max_request_bytes)
    app.add_middleware(ObserveRequests)
    app.add_middleware(NormalizeSlashes)

    if tracing_enabled():
        # Per-message send/receive spans would cost one span per SSE chunk.
        FastAPIInstrumentor.instrument_app(app, excluded_urls="health,metrics", exclude_spans=["receive", "send"])

    for family in (completions.router, embeddings.router, status.router):
        app.include_router(family)

    def deployment_openapi() -> dict:
        """FastAPI's document, plus the limits and model name this deployment was started with."""
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = document["components"]["schemas"]
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                fields = schemas[name]["properties"]
                fields["model"]["examples"] = [settings.model_name]
                for limit in ("max_tokens", "max_completion_tokens"):
                    if limit in fields:
                        fields[limit]["anyOf"][0]["maximum"] = settings.max_tokens_limit
            schemas["ChatCompletionRequest"]["properties"]["messages"]["maxItems"] = settings.max_messages
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = deployment_openapi  # type: ignore[method-assign]

    return app


async def _http_exception(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if isinstance(exc, Rejected):
        return exc.error.response()
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return OpenAIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers or {}).response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The traceback is for the operator's log; the client gets a stable message and the request
    # id (also in its X-Request-Id header) to quote.
    log.error("%s %s crashed", request.method, request.url.path, exc_info=exc)
    message = f"internal error in the edge while handling request {request_id(request.scope)}"
    return OpenAIError(500, message, "server_error", code="internal_error").response()
