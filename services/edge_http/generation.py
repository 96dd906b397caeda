"""One chat or completion request through the mesh, whichever endpoint it came to: checked,
routed to a model version, prepared (each of its prompts), charged, generated (`n` runs per
prompt), and answered as one JSON object or as server-sent events. A client that goes away
stops its generations upstream, streamed or not.

What differs between the endpoints (how prompts are prepared, how runs become OpenAI objects)
is a `Flow`: ChatFlow in chat.py, CompletionFlow in completions.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse
from opentelemetry import trace
from pydantic import BaseModel

from services.edge_http.choices import streamed_choices, whole_choices
from services.edge_http.guard import Guard, audited, settled, shared_settle
from services.edge_http.keys import KeyRecord
from services.edge_http.metrics import CACHE_RESULTS, TIME_TO_FIRST_TOKEN
from services.edge_http.models import Served
from services.edge_http.observe import request_id
from services.edge_http.openai_schema import REASONING_FIELDS, ReasoningTags, ResponseMeta, SamplingFields
from services.edge_http.pipeline import Pipeline, Run
from services.edge_http.routing import route, version_header
from services.edge_http.streaming import kept_alive, sse_stream
from services.edge_http.tools import ToolMode
from services.mesh.stubs import preprocess_pb2

T = TypeVar("T")
# What a request whose client left is logged with (nginx's "client closed request"); never sent.
CLIENT_GONE = 499


@dataclass(frozen=True)
class Plan:
    """Everything decided about a request before it costs anything, decided once (see
    docs/design.md, "Where each setting is decided"): the model version, each prompt as
    preprocess resolved it (token ids; sampling with every default and limit applied, stop
    strings included; the cache key made from exactly that), how many choices per prompt, and
    how the output is read."""

    target: Served
    prompts: tuple[preprocess_pb2.PreprocessReply, ...]  # chat: one
    choices: int = 1  # `n`, per prompt
    reasoning: ReasoningTags | None = None  # the output may open with a reasoning block
    reasoning_opened: bool = False  # the prompt opened it: the output starts inside it
    tools: ToolMode | None = None

    @property
    def prompt_tokens(self) -> int:
        """Every prompt counted once, as usage reports it."""
        return sum(len(p.token_ids) for p in self.prompts)

    @property
    def most_tokens(self) -> int:
        """What the request may cost at most: its prompts, and every choice at its max_tokens."""
        return self.prompt_tokens + self.choices * sum(p.sampling.max_tokens for p in self.prompts)


class Flow(Protocol):
    """What an endpoint decides: its response ids, its prompts, and the shape of its answers."""

    id_prefix: str

    async def plan(self, pipeline: Pipeline, target: Served, request_id: str) -> Plan: ...

    async def whole(self, run: Run, meta: ResponseMeta) -> BaseModel: ...

    def chunks(self, run: Run, meta: ResponseMeta, include_usage: bool) -> AsyncIterator[BaseModel]: ...


def _wants_no_cache(request: Request) -> bool:
    directives = request.headers.get("cache-control", "").lower()
    return "no-cache" in directives or "no-store" in directives


def _cache_status(runs: list[Run]) -> str:
    """One choice's cache outcome, or each distinct one for several choices (e.g. `hit,miss`)."""
    return ",".join(sorted({run.cache_status for run in runs}))


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (its body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone (with `work` cancelled, and its generations with it) if the
    client disconnects first: a non-streaming request is not generated for nobody."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientGone
    return task.result()


async def answer(request: Request, key: KeyRecord | None, body: SamplingFields, flow: Flow) -> Response:
    pipeline: Pipeline = request.app.state.pipeline
    guard: Guard = request.app.state.guard
    started = time.perf_counter()
    rid = request_id(request.scope)
    span = trace.get_current_span()
    span.set_attributes({"sluice.request_id": rid, "gen_ai.request.model": body.model, "sluice.stream": body.stream})
    guard.check(body)
    target = await route(request, key, body.model, "chat")
    body.model = target.id  # aliases answer with the model they stand for, as OpenAI's do
    plan = await flow.plan(pipeline, target, rid)
    account = audited(request, await guard.reserve(key, plan.most_tokens))

    async def opened() -> list[Run]:
        try:
            runs = await pipeline.open_choices(plan.target, plan.prompts, rid, _wants_no_cache(request), plan.choices)
        except BaseException:
            await account(0)  # nothing was generated: the reservation goes back
            raise
        parts = shared_settle(account, [len(run.prompt.token_ids) for run in runs], plan.prompt_tokens)
        for run, part in zip(runs, parts, strict=True):
            run.rest = settled(run.rest, run.first, part)
            CACHE_RESULTS.labels(run.cache_status).inc()
        TIME_TO_FIRST_TOKEN.labels(body.model).observe(time.perf_counter() - started)
        span.set_attribute("sluice.cache", _cache_status(runs))
        return runs

    named = request.app.state.settings.reasoning_field
    fields = REASONING_FIELDS if named == "both" else (named,)
    meta = ResponseMeta(
        f"{flow.id_prefix}-{rid}",
        int(time.time()),
        body.model,
        plan.reasoning,
        plan.tools,
        plan.reasoning_opened,
        fields,
    )
    headers = version_header(plan.target)
    if not body.stream:
        return await _whole(request, opened, flow, meta, plan.prompt_tokens, headers)
    headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    interval = request.app.state.settings.sse_keepalive_s
    opening = asyncio.ensure_future(opened())
    try:
        await asyncio.wait({opening}, timeout=interval)
    except asyncio.CancelledError:
        opening.cancel()  # the client left while waiting: stop the request upstream too
        raise

    def streamed(runs: list[Run]) -> AsyncIterator[BaseModel]:
        return streamed_choices(runs, meta, body.include_usage, flow.chunks, plan.prompt_tokens)

    if not opening.done():
        # A long wait in the queue or in prefill: answer now and keep the connection alive with
        # comments; a failure from here on becomes an error event, as after the first token.
        return EventSourceResponse(kept_alive(opening, interval, streamed), headers=headers)
    runs = opening.result()
    headers["X-Sluice-Cache"] = _cache_status(runs)
    return EventSourceResponse(sse_stream(streamed(runs)), headers=headers)


async def _whole(
    request: Request,
    opened: Callable[[], Awaitable[list[Run]]],
    flow: Flow,
    meta: ResponseMeta,
    prompt_tokens: int,
    headers: dict[str, str],
) -> Response:
    async def whole() -> JSONResponse:
        runs = await opened()
        headers["X-Sluice-Cache"] = _cache_status(runs)
        merged = await whole_choices(runs, meta, flow.whole, prompt_tokens)
        return JSONResponse(merged.model_dump(mode="json"), headers=headers)

    try:
        return await unless_client_leaves(request, whole())
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
