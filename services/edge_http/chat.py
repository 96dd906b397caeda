"""/v1/chat/completions: pipeline events → chat.completion and chat.completion.chunk objects."""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.edge_http.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ResponseMeta,
)
from services.edge_http.pipeline import Run


async def chat_completion(run: Run, meta: ResponseMeta) -> ChatCompletion:
    text, last = await run.collect()
    return ChatCompletion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=last.finish_reason or "stop")],
        usage=last.usage,
    )


async def chat_chunks(run: Run, meta: ResponseMeta, include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=meta.id,
            created=meta.created,
            model=meta.model,
            choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)],
        )

    # OpenAI opens with the role and an empty content; clients key on it.
    yield chunk({"role": "assistant", "content": ""})
    async for event in run.events():
        if event.text:
            yield chunk({"content": event.text})
        if event.finish_reason:
            yield chunk({}, event.finish_reason)
            if include_usage:
                yield ChatCompletionChunk(
                    id=meta.id, created=meta.created, model=meta.model, choices=[], usage=event.usage
                )
