"""The OpenAI-compatible HTTP surface: routes, error handlers and ASGI middleware."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.sse import EventSourceResponse
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from services.edge_http.chat import chat_chunks, chat_completion
from services.edge_http.choices import streamed_choices, whole_choices
from services.edge_http.completions import completion_chunks, text_completion
from services.edge_http.embeddings import embed_inputs, embedding_list
from services.edge_http.errors import (
    RETRY_AFTER_S,
    OpenAIError,
    handle_openai_error,
    handle_validation_error,
)
from services.edge_http.guard import Guard, Settle, bearer, settled, shared_settle
from services.edge_http.intake import CheckedRoute, LimitRequest, Rejected
from services.edge_http.keys import KeyRecord
from services.edge_http.metrics import CACHE_RESULTS, TIME_TO_FIRST_TOKEN
from services.edge_http.models import VERSION_HEADER, ModelRouter, Served, UnknownModel, UnknownVersion
from services.edge_http.observe import ObserveRequests, request_id, set_model
from services.edge_http.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorBody,
    Model,
    ModelList,
    RerankRequest,
    ResponseMeta,
    SamplingFields,
)
from services.edge_http.pipeline import Pipeline, Run
from services.edge_http.readiness import readiness
from services.edge_http.rerank import ranked, rerank_inputs
from services.edge_http.streaming import kept_alive, sse_stream
from services.edge_http.tools import forced_prefix
from services.edge_http.upstreams import Upstreams
from services.mesh.config import Settings
from services.mesh.consul import ConsulDiscovery
from services.mesh.discovery import UPSTREAM_SERVICES, StaticDiscovery
from services.mesh.stubs import inference_pb2, preprocess_pb2
from services.mesh.telemetry import shutdown_tracing, tracing_enabled

log = logging.getLogger(__name__)

BodyT = TypeVar("BodyT", bound=SamplingFields)

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


def _wants_no_cache(request: Request) -> bool:
    directives = request.headers.get("cache-control", "").lower()
    return "no-cache" in directives or "no-store" in directives


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
        pipeline: Pipeline = request.app.state.pipeline
        prepare = pipeline.prepare_chat
        return await _complete(request, key, body, prepare, "chatcmpl", chat_chunks, chat_completion)

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request, key: Caller) -> Response:
        """OpenAI (legacy) text completions; `stream: true` answers with server-sent events."""
        pipeline: Pipeline = request.app.state.pipeline
        prepare = pipeline.prepare_completion
        return await _complete(request, key, body, prepare, "cmpl", completion_chunks, text_completion)

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models(request: Request, key: Caller) -> ModelList:
        """Every model id (and alias of one) with at least one healthy instance."""
        upstreams: Upstreams = request.app.state.upstreams
        await upstreams.describe_all()
        serving = {s.id: s for s in upstreams.served() if s.healthy}
        names = {model_id: model_id for model_id in serving}
        names |= {alias: target for alias, target in router.aliases.items() if target in serving}
        visible = [(name, serving[target]) for name, target in sorted(names.items())
                   if key is None or key.allows(name) or key.allows(target)]  # fmt: skip
        return ModelList(data=[Model(id=name, created=s.created, owned_by="sluice") for name, s in visible])

    @app.post("/v1/embeddings", responses=ERROR_RESPONSES)
    async def embeddings(body: EmbeddingRequest, request: Request, key: Caller) -> JSONResponse:
        """OpenAI embeddings from an instance serving an embedding model; batched with other callers."""
        target, reply = await _embed(request, key, body.model, embed_inputs(body))
        result = embedding_list(body, target.id, reply)
        return JSONResponse(result.model_dump(mode="json"), headers=_version_header(target))

    @app.post("/v1/rerank", responses=ERROR_RESPONSES)
    async def rerank(body: RerankRequest, request: Request, key: Caller) -> JSONResponse:
        """Documents ordered by relevance to the query (Jina/Cohere shape), scored by an embedding model."""
        target, reply = await _embed(request, key, body.model, rerank_inputs(body))
        return JSONResponse(ranked(body, target.id, reply).model_dump(mode="json"), headers=_version_header(target))

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


async def _complete(
    request: Request,
    key: KeyRecord | None,
    body: BodyT,
    prepare: Callable[[BodyT, str, str, str], Awaitable[preprocess_pb2.PreprocessReply]],
    id_prefix: str,
    chunks: Callable[[Run, ResponseMeta, bool], AsyncIterator[BaseModel]],
    whole: Callable[[Run, ResponseMeta], Awaitable[BaseModel]],
) -> Response:
    """Shared by both completion endpoints: run the pipeline, answer as SSE or one JSON object."""
    pipeline: Pipeline = request.app.state.pipeline
    guard: Guard = request.app.state.guard
    started = time.perf_counter()
    rid = request_id(request.scope)
    span = trace.get_current_span()
    span.set_attributes({"sluice.request_id": rid, "gen_ai.request.model": body.model, "sluice.stream": body.stream})
    guard.check(body)
    target = await _route(request, key, body.model, "chat")
    body.model = target.id  # aliases answer with the model they stand for, as OpenAI's do
    tools = _tool_mode(body, target)
    # Constrained JSON starts at its first byte: no thinking block to split off.
    reasoning = target.reasoning if body.json_schema is None else None
    prepared = await prepare(body, rid, tools[1] if tools else "", reasoning[0] if reasoning else "")
    guard.fit(prepared)
    n = body.n or 1
    prompt_tokens = len(prepared.token_ids)
    account = _audited(request, await guard.reserve(key, prompt_tokens + n * prepared.sampling.max_tokens))

    async def opened() -> list[Run]:
        try:
            runs = await pipeline.open_choices(target, prepared, rid, _wants_no_cache(request), n)
        except BaseException:
            await account(0)  # nothing was generated: the reservation goes back
            raise
        part = shared_settle(account, n, prompt_tokens)
        for run in runs:
            run.rest = settled(run.rest, run.first, part)
            CACHE_RESULTS.labels(run.cache_status).inc()
        TIME_TO_FIRST_TOKEN.labels(body.model).observe(time.perf_counter() - started)
        span.set_attribute("sluice.cache", _cache_status(runs))
        return runs

    meta = ResponseMeta(f"{id_prefix}-{rid}", int(time.time()), body.model, reasoning, tools, prepared.reasoning_opened)
    headers = _version_header(target)
    if not body.stream:
        runs = await opened()
        headers["X-Sluice-Cache"] = _cache_status(runs)
        return JSONResponse((await whole_choices(runs, meta, whole)).model_dump(mode="json"), headers=headers)
    headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    interval = request.app.state.settings.sse_keepalive_s
    opening = asyncio.ensure_future(opened())
    try:
        await asyncio.wait({opening}, timeout=interval)
    except asyncio.CancelledError:
        opening.cancel()  # the client left while waiting: stop the request upstream too
        raise
    if not opening.done():
        # A long wait in the queue or in prefill: answer now and keep the connection alive with
        # comments; a failure from here on becomes an error event, as after the first token.
        stream = kept_alive(opening, interval, lambda runs: streamed_choices(runs, meta, body.include_usage, chunks))
        return EventSourceResponse(stream, headers=headers)
    runs = opening.result()
    headers["X-Sluice-Cache"] = _cache_status(runs)
    return EventSourceResponse(sse_stream(streamed_choices(runs, meta, body.include_usage, chunks)), headers=headers)


def _cache_status(runs: list[Run]) -> str:
    """One choice's cache outcome, or each distinct one for `n` > 1 (e.g. `hit,miss`)."""
    return ",".join(sorted({run.cache_status for run in runs}))


async def _route(request: Request, key: KeyRecord | None, name: str, kind: str) -> Served:
    """The model version that serves this request (aliases, weights, the pin header), checked
    against the key and the endpoint's kind; labels the request's metrics and trace with it."""
    router: ModelRouter = request.app.state.router
    upstreams: Upstreams = request.app.state.upstreams
    guard: Guard = request.app.state.guard
    model_id = router.resolve(name)
    guard.allow_model(key, name, model_id)
    pinned = request.headers.get(VERSION_HEADER)
    try:
        if not any(s.id == model_id for s in upstreams.served()):
            await upstreams.describe_all()
        target = router.choose(model_id, upstreams.served(), pinned)
    except UnknownModel:
        if any(e.info is None for e in upstreams.pools["inference"].endpoints):
            raise OpenAIError(
                503, "inference instances are still starting", "service_unavailable",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None  # fmt: skip
        raise OpenAIError(
            404, f"the model `{name}` does not exist", param="model", code="model_not_found"
        ) from None  # fmt: skip
    except UnknownVersion as err:
        raise OpenAIError(404, str(err), param=VERSION_HEADER, code="model_version_not_found") from None
    if target.kind != kind:
        use = "/v1/embeddings" if target.kind == "embedding" else "/v1/chat/completions"
        raise OpenAIError(400, f"`{name}` is a {target.kind} model: use {use}", param="model", code="wrong_model_kind")
    set_model(request.scope, target.id)
    trace.get_current_span().set_attributes(
        {"gen_ai.response.model": target.id, "sluice.model.version": target.version}
    )
    return target


async def _embed(
    request: Request, key: KeyRecord | None, model: str, inputs: list[inference_pb2.EmbedInput]
) -> tuple[Served, inference_pb2.EmbedReply]:
    """One Embed call on an instance of the embedding model, charged to the key's tokens."""
    pipeline: Pipeline = request.app.state.pipeline
    guard: Guard = request.app.state.guard
    target = await _route(request, key, model, "embedding")
    account = _audited(request, await guard.reserve(key, 1))
    reply = await pipeline.embed(target, inputs, request_id(request.scope))
    await account(reply.prompt_tokens)
    return target, reply


def _audited(request: Request, settle: Settle) -> Settle:
    """The settlement, also noting the tokens used on the request's audit line."""

    async def account(used: int | None) -> None:
        request.scope["state"]["tokens"] = used
        await settle(used)

    return account


def _tool_mode(body: SamplingFields, target: Served) -> tuple[str, str] | None:
    """(parser, forced start of the assistant's turn) when the request offers tools."""
    if not isinstance(body, ChatCompletionRequest) or not body.calls_tools:
        return None
    if not target.tool_parser:
        raise OpenAIError(400, f"`{target.id}` does not call tools (its chat template has no tools)", param="tools")
    forced = body.tool_choice == "required" or body.forced_function is not None
    return target.tool_parser, forced_prefix(target.tool_parser, body.forced_function) if forced else ""


def _version_header(target: Served) -> dict[str, str]:
    return {VERSION_HEADER: target.version} if target.version else {}


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
