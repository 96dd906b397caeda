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
from services.edge_http.reasoning import ReasoningSplitter


def _splitter(meta: ResponseMeta) -> ReasoningSplitter | None:
    return ReasoningSplitter(*meta.reasoning) if meta.reasoning else None


async def chat_completion(run: Run, meta: ResponseMeta) -> ChatCompletion:
    text, last = await run.collect()
    message = AssistantMessage(content=text)
    if splitter := _splitter(meta):
        parts = [splitter.feed(text), splitter.finish()]
        message = AssistantMessage(
            content="".join(p.content for p in parts), reasoning_content="".join(p.reasoning for p in parts)
        )
    return ChatCompletion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[ChatChoice(message=message, finish_reason=last.finish_reason or "stop")],
        usage=last.usage,
    )


def _deltas(text: str, splitter: ReasoningSplitter | None, final: bool) -> list[dict[str, str]]:
    """The content deltas for a piece of text: reasoning and answer apart for reasoning models."""
    if splitter is None:
        return [{"content": text}] if text else []
    parts = [splitter.feed(text), *([splitter.finish()] if final else [])]
    deltas = []
    for part in parts:
        if part.reasoning:
            deltas.append({"reasoning_content": part.reasoning})
        if part.content:
            deltas.append({"content": part.content})
    return deltas


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
    splitter = _splitter(meta)
    async for event in run.events():
        for delta in _deltas(event.text, splitter, final=bool(event.finish_reason)):
            yield chunk(delta)
        if event.finish_reason:
            yield chunk({}, event.finish_reason)
            if include_usage:
                yield ChatCompletionChunk(
                    id=meta.id, created=meta.created, model=meta.model, choices=[], usage=event.usage
                )
