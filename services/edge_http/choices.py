"""Several choices (`n` > 1, or several prompts of a completion request), answered as one response.

Each choice is its own run through the engine (continuous batching runs them side by side);
this module merges their responses the way OpenAI shapes them: choices numbered in the order
of the runs (prompt by prompt, `n` each), every prompt counted once in usage and the
completions summed. Streamed, the choices' chunks interleave as they come, each carrying its
choice's index.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from services.edge_http.openai_schema import PromptTokensDetails, ResponseMeta, Usage
from services.edge_http.pipeline import Run

Response = TypeVar("Response", bound=BaseModel)


def _total(usages: list[tuple[Run, Usage]], prompt_tokens: int) -> Usage:
    """Every completion summed; each prompt and what of it was cached counted once (by its first choice)."""
    completion = sum(u.completion_tokens for _, u in usages)
    cached = sum(u.prompt_tokens_details.cached_tokens for run, u in usages if not run.shares_prompt)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def _numbered(response: Any, index: int) -> Any:
    for choice in response.choices:
        choice.index = index
    return response


async def whole_choices(
    runs: list[Run], meta: ResponseMeta, whole: Callable[[Run, ResponseMeta], Awaitable[Response]], prompt_tokens: int
) -> Response:
    """`prompt_tokens`: the request's prompts, each counted once."""
    tasks = [asyncio.ensure_future(whole(run, meta)) for run in runs]
    try:
        parts: list[Any] = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # a choice failed or the client left: the others stop upstream too
    merged = parts[0]
    if len(parts) > 1:
        merged.choices = [choice for i, part in enumerate(parts) for choice in _numbered(part, i).choices]
        merged.usage = _total([(run, part.usage) for run, part in zip(runs, parts, strict=True)], prompt_tokens)
    return merged


async def streamed_choices(
    runs: list[Run],
    meta: ResponseMeta,
    include_usage: bool,
    chunks: Callable[[Run, ResponseMeta, bool], AsyncIterator[Any]],
    prompt_tokens: int,
) -> AsyncIterator[Any]:
    if len(runs) == 1:
        async for chunk in chunks(runs[0], meta, include_usage):
            yield chunk
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(index: int, run: Run) -> None:
        try:
            async for chunk in chunks(run, meta, True):
                await queue.put((index, chunk))
            await queue.put((index, done))
        except Exception as err:  # re-raised in the response's stream, which reports it
            await queue.put((index, err))

    tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
    usages: list[tuple[Run, Any]] = []  # each choice's usage-only chunk
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            elif not item.choices:  # a choice's usage: summed into one chunk at the end
                usages.append((runs[index], item))
            else:
                yield _numbered(item, index)
        if include_usage:
            total = _total([(run, chunk.usage) for run, chunk in usages], prompt_tokens)
            yield usages[0][1].model_copy(update={"usage": total})
    finally:
        for task in tasks:
            task.cancel()  # the client left or a choice failed: stop the others upstream too
