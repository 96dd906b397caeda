"""Server-sent events exactly as strict clients (Dify) parse them.

Every event is `data: <one-line JSON>\\n\\n` (LF only, no event/id lines); the stream ends
with `data: [DONE]\\n\\n`. A failure after the stream started becomes one error event
without `choices`, then [DONE] — the HTTP status is already 200 by then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.sse import format_sse_event
from pydantic import BaseModel

from services.edge_http.core.failures import EdgeError
from services.edge_http.http_api.errors import openai_error

log = logging.getLogger(__name__)

DONE = format_sse_event(data_str="[DONE]")
PING = b": ping\n\n"


def sse_event(payload: BaseModel) -> bytes:
    # OpenAI leaves `usage` out of chunks that have none; `finish_reason: null` stays.
    exclude = {"usage"} if getattr(payload, "usage", True) is None else None
    return format_sse_event(data_str=payload.model_dump_json(exclude=exclude))


async def kept_alive(
    opening: asyncio.Future, interval_s: float, chunks: Callable[[Any], AsyncIterator[BaseModel]]
) -> AsyncIterator[bytes]:
    """A `: ping` comment every `interval_s` until the run opens (the caller already waited one
    interval), then its stream; a client that leaves meanwhile cancels the run."""
    try:
        yield PING
        while not opening.done():
            await asyncio.wait({opening}, timeout=interval_s)
            if not opening.done():
                yield PING
    finally:
        opening.cancel()  # no-op once it finished

    async def opened_chunks() -> AsyncIterator[BaseModel]:
        async for chunk in chunks(opening.result()):  # a failed opening ends as sse_stream's error event
            yield chunk

    async for data in sse_stream(opened_chunks()):
        yield data


async def sse_stream(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield sse_event(chunk)
    except EdgeError as err:
        log.warning("stream failed after it started: %s", err.message)
        yield sse_event(openai_error(err).body())
    yield DONE
