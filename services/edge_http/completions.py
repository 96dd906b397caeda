"""/v1/completions: pipeline events → text_completion objects (streamed or whole)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.edge_http.openai_schema import Completion, CompletionChoice, ResponseMeta
from services.edge_http.pipeline import Run


async def text_completion(run: Run, meta: ResponseMeta) -> Completion:
    text, last = await run.collect()
    return Completion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[CompletionChoice(text=text, finish_reason=last.finish_reason or "stop")],
        usage=last.usage,
    )


async def completion_chunks(run: Run, meta: ResponseMeta, include_usage: bool) -> AsyncIterator[Completion]:
    def chunk(text: str, finish_reason: str | None = None) -> Completion:
        return Completion(
            id=meta.id,
            created=meta.created,
            model=meta.model,
            choices=[CompletionChoice(text=text, finish_reason=finish_reason)],
        )

    async for event in run.events():
        if event.text:
            yield chunk(event.text)
        if event.finish_reason:
            yield chunk("", event.finish_reason)
            if include_usage:
                yield Completion(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=event.usage)
