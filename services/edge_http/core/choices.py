"""The choices of a request (`n` per prompt, and every prompt of a text completion request):
opened together, and their events merged into one stream.

Each choice is its own run through the engine (continuous batching runs them side by side).
Choices are numbered as OpenAI numbers them: prompt by prompt, `n` each. Streamed, their events
interleave as they come; whole, each choice's output is complete before it is given. The request's
usage counts every prompt once and sums the completions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

from services.edge_http.core.accounting import Settle
from services.edge_http.core.context import RequestContext
from services.edge_http.core.events import Done, Finish, OutputEvent, WholeAnswer
from services.edge_http.core.model_versions import Served
from services.edge_http.core.runs import Run, RunOpener, choice_of
from services.edge_http.core.shaping import OutputRules, choice_events, whole_choice
from services.edge_http.openai_schema import PromptTokensDetails, Usage
from services.mesh.stubs import preprocess_pb2


async def open_choices(
    opener: RunOpener,
    target: Served,
    prompts: Sequence[preprocess_pb2.PreprocessReply],
    n: int,
    settles: Sequence[Settle],
    context: RequestContext,
) -> list[Run]:
    """`n` runs of each prompt, prompts side by side, choice p * n + i settling with settles[p * n + i];
    if one fails, the others are closed."""

    async def of_prompt(p: int, prepared: preprocess_pb2.PreprocessReply) -> list[Run]:
        """One prompt's `n` runs. The first opens alone: once it has a token, its prompt's KV is in
        the prefix cache of the instance that computed it, and prefix-aware routing sends the
        others there to read it rather than compute it again each."""
        first = await opener.open(target, prepared, context, settles[p * n])
        try:
            others = [
                _one(opener.open(target, choice_of(prepared, i), context, settles[p * n + i], shares_prompt=True))
                for i in range(1, n)
            ]
            return [first, *await _together(others)]
        except BaseException:
            await first.close()
            raise

    return await _together([of_prompt(p, prepared) for p, prepared in enumerate(prompts)])


async def _one(opening: Awaitable[Run]) -> list[Run]:
    return [await opening]


async def _together(openings: list[Awaitable[list[Run]]]) -> list[Run]:
    """Every opening's runs, in order, opened side by side; if one fails, the runs the others
    opened are closed (their calls upstream end) and the failure is raised."""
    tasks = [asyncio.ensure_future(opening) for opening in openings]
    try:
        return [run for runs in await asyncio.gather(*tasks) for run in runs]
    except BaseException:
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            for run in outcome if isinstance(outcome, list) else ():
                await run.close()
        raise


def total_usage(finished: Sequence[tuple[Run, Usage]], prompt_tokens: int) -> Usage:
    """The request's usage from its choices': one choice's own; for several, every completion
    summed, and each prompt and what of it was cached counted once (by its first choice)."""
    if len(finished) == 1:
        return finished[0][1]
    completion = sum(u.completion_tokens for _, u in finished)
    cached = sum(u.prompt_tokens_details.cached_tokens for run, u in finished if not run.shares_prompt)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


async def streamed(
    runs: list[Run], rules: OutputRules | None, echo: bool, prompt_tokens: int
) -> AsyncIterator[OutputEvent]:
    """Every choice's events as they come, then the request's usage."""
    finished: list[tuple[Run, Usage]] = []
    if len(runs) == 1:
        async for event in choice_events(runs[0], 0, rules, echo):
            if isinstance(event, Finish):
                finished.append((runs[0], event.usage))
            yield event
        if finished:
            yield Done(total_usage(finished, prompt_tokens))
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(index: int, run: Run) -> None:
        try:
            async for event in choice_events(run, index, rules, echo):
                await queue.put((index, event))
            await queue.put((index, done))
        except Exception as err:  # re-raised in the merged stream, which reports it
            await queue.put((index, err))

    tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is done:
                running -= 1
                continue
            if isinstance(item, Exception):
                raise item
            if isinstance(item, Finish):
                finished.append((runs[index], item.usage))
            yield item
        yield Done(total_usage(finished, prompt_tokens))
    finally:
        for task in tasks:
            task.cancel()  # the caller left or a choice failed: stop the others upstream too


async def whole(runs: list[Run], rules: OutputRules | None, echo: bool, prompt_tokens: int) -> WholeAnswer:
    """Every choice's whole output once all have finished, and the request's usage."""
    tasks = [asyncio.ensure_future(whole_choice(run, i, rules, echo)) for i, run in enumerate(runs)]
    try:
        outputs = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # a choice failed or the caller left: the others stop upstream too
    usage = total_usage([(run, out.finish.usage) for run, out in zip(runs, outputs, strict=True)], prompt_tokens)
    return WholeAnswer(tuple(outputs), usage)
