"""A chat or text completion answered over HTTP: the core admits and opens the request, and its
events leave as one JSON object or as server-sent events.

HTTP's own concerns live here: a stream whose first token is slow is answered at once and kept
alive with SSE comments; a client that disconnects stops its generations upstream, streamed or
not; the response headers say which model version answered and whether the cache did.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse
from opentelemetry import trace
from pydantic import BaseModel

from services.edge_http.core.admission import Caller
from services.edge_http.core.context import VERSION_HEADER, RequestContext
from services.edge_http.core.edge import EdgeCore
from services.edge_http.core.generation import Opened
from services.edge_http.core.model_versions import Served
from services.edge_http.core.plans import GenerationRequest
from services.edge_http.http_api.meta import REASONING_FIELDS, ResponseMeta, Shape
from services.edge_http.http_api.sse import kept_alive, sse_stream

T = TypeVar("T")
# What a request whose client left is logged with (nginx's "client closed request"); never sent.
CLIENT_GONE = 499


def version_header(target: Served) -> dict[str, str]:
    """The response header that says which version of the model answered (versioned models only)."""
    return {VERSION_HEADER: target.version} if target.version else {}


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


async def answer(
    request: Request,
    core: EdgeCore,
    caller: Caller,
    body: GenerationRequest,
    context: RequestContext,
    shape: Shape,
) -> Response:
    trace.get_current_span().set_attribute("sluice.stream", bool(body.stream))
    admitted = await core.generations.admit(caller, body, context)
    plan = admitted.plan
    named = core.settings.reasoning_field
    meta = ResponseMeta(
        f"{shape.id_prefix}-{context.request_id}",
        int(time.time()),
        plan.target.id,  # aliases answer with the model they stand for, as OpenAI's do
        reasons=plan.rules is not None and plan.rules.reasoning is not None,
        reasoning_fields=REASONING_FIELDS if named == "both" else (named,),
        include_usage=body.include_usage,
    )
    headers = version_header(plan.target)

    def opened() -> Awaitable[Opened]:
        return core.generations.open(admitted, context)

    if not body.stream:
        return await _whole(request, opened, shape, meta, headers)
    headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    interval = core.settings.sse_keepalive_s
    opening = asyncio.ensure_future(opened())
    try:
        await asyncio.wait({opening}, timeout=interval)
    except asyncio.CancelledError:
        opening.cancel()  # the client left while waiting: stop the request upstream too
        raise

    def streamed(ready: Opened) -> AsyncIterator[BaseModel]:
        return shape.chunks(ready.events(), meta)

    if not opening.done():
        # A long wait in the queue or in prefill: answer now and keep the connection alive with
        # comments; a failure from here on becomes an error event, as after the first token.
        return EventSourceResponse(kept_alive(opening, interval, streamed), headers=headers)
    ready = opening.result()
    headers["X-Sluice-Cache"] = ready.cache_status
    return EventSourceResponse(sse_stream(streamed(ready)), headers=headers)


async def _whole(
    request: Request,
    opened: Callable[[], Awaitable[Opened]],
    shape: Shape,
    meta: ResponseMeta,
    headers: dict[str, str],
) -> Response:
    async def whole() -> JSONResponse:
        ready = await opened()
        headers["X-Sluice-Cache"] = ready.cache_status
        answered = shape.whole(await ready.whole(), meta)
        return JSONResponse(answered.model_dump(mode="json"), headers=headers)

    try:
        return await unless_client_leaves(request, whole())
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
