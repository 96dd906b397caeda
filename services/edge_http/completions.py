"""/v1/completions: pipeline events → text_completion objects (streamed or whole)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.edge_http.logprobs import completion_logprobs
from services.edge_http.openai_schema import Completion, CompletionChoice, CompletionLogprobs, ResponseMeta
from services.edge_http.pipeline import Run


async def text_completion(run: Run, meta: ResponseMeta) -> Completion:
    text, last, logprobs = await run.collect()
    return Completion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[
            CompletionChoice(
                text=text, logprobs=completion_logprobs(logprobs), finish_reason=last.finish_reason or "stop"
            )
        ],
        usage=last.usage,
    )


async def completion_chunks(run: Run, meta: ResponseMeta, include_usage: bool) -> AsyncIterator[Completion]:
    def chunk(text: str, finish_reason: str | None = None, logprobs: CompletionLogprobs | None = None) -> Completion:
        return Completion(
            id=meta.id,
            created=meta.created,
            model=meta.model,
            choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish_reason)],
        )

    offset = 0
    async for event in run.events():
        logprobs = completion_logprobs(event.logprobs, offset)
        offset += sum(len(e.token) for e in event.logprobs)
        if event.text or logprobs:
            yield chunk(event.text, logprobs=logprobs)
        if event.finish_reason:
            yield chunk("", event.finish_reason)
            if include_usage:
                yield Completion(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=event.usage)
