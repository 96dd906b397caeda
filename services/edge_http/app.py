"""The OpenAI-compatible HTTP surface: routes, error handlers and ASGI middleware."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from services.edge_http.chat import ChatFlow
from services.edge_http.completions import CompletionFlow
from services.edge_http.embeddings import embed_inputs, embedding_list
from services.edge_http.errors import (
    OpenAIError,
    handle_openai_error,
    handle_validation_error,
)
from services.edge_http.generation import answer
from services.edge_http.guard import Guard, audited, bearer
from services.edge_http.intake import CheckedRoute, LimitRequest, Rejected
from services.edge_http.keys import KeyRecord
from services.edge_http.models import ModelRouter, Served
from services.edge_http.observe import ObserveRequests, request_id
from services.edge_http.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorBody,
    Model,
    ModelList,
    RerankRequest,
)
from services.edge_http.pipeline import Pipeline
from services.edge_http.readiness import readiness
from services.edge_http.rerank import ranked, rerank_inputs
from services.edge_http.routing import route, version_header
from services.edge_http.upstreams import Upstreams
from services.mesh.config import Settings
from services.mesh.consul import ConsulDiscovery
from services.mesh.discovery import UPSTREAM_SERVICES, StaticDiscovery
from services.mesh.stubs import inference_pb2
from services.mesh.telemetry import shutdown_tracing, tracing_enabled

log = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 413, 429, 500, 503, 504)
}


class NormalizeSlashes:
    """Collapse repeated slashes so a base URL typed as `…/v1/` still reaches `/v1/chat/completions`."""

    _REPEATED = re.compile(r"/{2,}")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "//" in scope["path"]:
            scope = {**scope, "path": self._REPEATED.sub("/", scope["path"])}
        await self.app(scope, receive, send)


async def _caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> KeyRecord | None:
    guard: Guard = request.app.state.guard
    return await guard.authenticate(request, credentials)


# The caller's API key record (None when the edge runs --no-auth).
Caller = Annotated[KeyRecord | None, Depends(_caller)]


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        discovery = (
            ConsulDiscovery(settings) if settings.discovery == "consul" else StaticDiscovery.from_settings(settings)
        )
        upstreams = Upstreams(settings, discovery)
        app.state.upstreams = upstreams
        app.state.pipeline = Pipeline(upstreams, settings)
        yield
        await upstreams.close()
        # Here, not after uvicorn returns: uvicorn re-raises the SIGTERM it caught once it is done.
        shutdown_tracing()

    app = FastAPI(
        title="Sluice OpenAI-compatible API",
        version="1",
        lifespan=lifespan,
        exception_handlers={
            RequestValidationError: handle_validation_error,
            OpenAIError: handle_openai_error,
            HTTPException: _http_exception,
            Exception: _unexpected,
        },
    )
    app.state.settings = settings
    app.state.guard = Guard(settings)
    router = app.state.router = ModelRouter(settings.model_weights, settings.model_aliases)
    app.router.route_class = CheckedRoute
    app.add_middleware(LimitRequest, max_bytes=settings.max_request_bytes)
    app.add_middleware(ObserveRequests)
    app.add_middleware(NormalizeSlashes)

    if tracing_enabled():
        # Per-message send/receive spans would cost one span per SSE chunk.
        FastAPIInstrumentor.instrument_app(app, excluded_urls="health,metrics", exclude_spans=["receive", "send"])

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request, key: Caller) -> Response:
        """OpenAI chat completions; `stream: true` answers with server-sent events."""
        return await answer(request, key, body, ChatFlow(body))

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request, key: Caller) -> Response:
        """OpenAI (legacy) text completions; `stream: true` answers with server-sent events."""
        return await answer(request, key, body, CompletionFlow(body))

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models(request: Request, key: Caller) -> ModelList:
        """Every model id (and alias of one) with at least one healthy instance."""
        upstreams: Upstreams = request.app.state.upstreams
        await upstreams.describe_all()
        serving = {s.id: s for s in upstreams.served() if s.healthy}
        names = {model_id: model_id for model_id in serving}
        names |= {alias: target for alias, target in router.aliases.items() if target in serving}
        visible = [
            (name, serving[target])
            for name, target in sorted(names.items())
            if key is None or key.allows(name) or key.allows(target)
        ]
        return ModelList(data=[Model(id=name, created=s.created, owned_by="sluice") for name, s in visible])

    @app.post("/v1/embeddings", responses=ERROR_RESPONSES)
    async def embeddings(body: EmbeddingRequest, request: Request, key: Caller) -> JSONResponse:
        """OpenAI embeddings from an instance serving an embedding model; batched with other callers."""
        target, reply = await _embed(request, key, body.model, embed_inputs(body), body.truncate_prompt_tokens)
        result = embedding_list(body, target.id, reply)
        return JSONResponse(result.model_dump(mode="json"), headers=version_header(target))

    @app.post("/v1/rerank", responses=ERROR_RESPONSES)
    async def rerank(body: RerankRequest, request: Request, key: Caller) -> JSONResponse:
        """Documents ordered by relevance to the query (Jina/Cohere shape), scored by an embedding model."""
        target, reply = await _embed(request, key, body.model, rerank_inputs(body))
        return JSONResponse(ranked(body, target.id, reply).model_dump(mode="json"), headers=version_header(target))

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Ready to serve: per service and per model, how many instances are SERVING; 503 when some
        model or a required service has none, `degraded` (200) when only some replicas are down."""
        upstreams: Upstreams = request.app.state.upstreams
        verdict = readiness(UPSTREAM_SERVICES, await upstreams.health())
        body = {
            "status": verdict.status,
            "services": {name: asdict(a) for name, a in verdict.services.items()},
            "models": {name: asdict(a) for name, a in verdict.models.items()},
        }
        return JSONResponse(body, status_code=verdict.http_status)

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

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _embed(
    request: Request,
    key: KeyRecord | None,
    model: str,
    inputs: list[inference_pb2.EmbedInput],
    truncate: int | None = None,
) -> tuple[Served, inference_pb2.EmbedReply]:
    """One Embed call on an instance of the embedding model, charged to the key's tokens."""
    pipeline: Pipeline = request.app.state.pipeline
    guard: Guard = request.app.state.guard
    target = await route(request, key, model, "embedding")
    account = audited(request, await guard.reserve(key, 1))
    reply = await pipeline.embed(target, inputs, request_id(request.scope), truncate)
    await account(reply.prompt_tokens)
    return target, reply


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
