"""/v1/completions: each prompt (text or token ids) generated `n` times; pipeline events →
text_completion objects, streamed or whole, with the prompt echoed before its completion
when asked (and its tokens' log probabilities, the first one null as OpenAI's are)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.edge_http.generation import Plan
from services.edge_http.logprobs import completion_logprobs, joined
from services.edge_http.models import Served
from services.edge_http.openai_schema import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ResponseMeta,
)
from services.edge_http.pipeline import Pipeline, Run


@dataclass(frozen=True)
class CompletionFlow:
    body: CompletionRequest
    id_prefix: str = "cmpl"

    async def plan(self, pipeline: Pipeline, target: Served, request_id: str) -> Plan:
        prompts = [pipeline.prepare_completion(self.body, prompt, request_id) for prompt in self.body.prompts]
        return Plan(target, tuple(await asyncio.gather(*prompts)), self.body.n or 1)

    async def whole(self, run: Run, meta: ResponseMeta) -> Completion:
        return await text_completion(run, meta, self.body.echo)

    def chunks(self, run: Run, meta: ResponseMeta, include_usage: bool) -> AsyncIterator[Completion]:
        return completion_chunks(run, meta, include_usage, self.body.echo)


def _echoed(run: Run) -> tuple[str, CompletionLogprobs | None]:
    """The prompt as the completion's start, with its tokens' log probabilities when asked."""
    return run.prompt.prompt_text, completion_logprobs(run.first.prompt_logprobs, first_unscored=True)


async def text_completion(run: Run, meta: ResponseMeta, echo: bool = False) -> Completion:
    text, last, logprobs = await run.collect()
    prefix, prefix_logprobs = _echoed(run) if echo else ("", None)
    generated = completion_logprobs(logprobs, text_offset=len(prefix))
    return Completion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[
            CompletionChoice(
                text=prefix + text,
                logprobs=joined(prefix_logprobs, generated),
                finish_reason=last.finish_reason or "stop",
            )
        ],
        usage=last.usage,
    )


async def completion_chunks(
    run: Run, meta: ResponseMeta, include_usage: bool, echo: bool = False
) -> AsyncIterator[Completion]:
    def chunk(text: str, finish_reason: str | None = None, logprobs: CompletionLogprobs | None = None) -> Completion:
        return Completion(
            id=meta.id,
            created=meta.created,
            model=meta.model,
            choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish_reason)],
        )

    offset = 0
    if echo:
        prompt, prompt_logprobs = _echoed(run)
        yield chunk(prompt, logprobs=prompt_logprobs)
        offset = len(prompt)
    async for event in run.events():
        logprobs = completion_logprobs(event.logprobs, offset)
        offset += sum(len(e.token) for e in event.logprobs)
        if event.text or logprobs:
            yield chunk(event.text, logprobs=logprobs)
        if event.finish_reason:
            yield chunk("", event.finish_reason)
            if include_usage:
                yield Completion(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=event.usage)
