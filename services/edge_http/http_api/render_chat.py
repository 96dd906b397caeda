"""The core's events → chat.completion (whole) and chat.completion.chunk objects (streamed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from services.edge_http.core.events import Delta, Done, Finish, OutputEvent, WholeAnswer
from services.edge_http.core.tools import ToolCall
from services.edge_http.http_api.logprobs import chat_logprobs
from services.edge_http.http_api.meta import ResponseMeta, Shape
from services.edge_http.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    FunctionCall,
    ToolCallOut,
)


def _tool_call(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def whole(answer: WholeAnswer, meta: ResponseMeta) -> ChatCompletion:
    choices = []
    for choice in answer.choices:
        out = choice.output
        reasoning = {name: out.reasoning for name in meta.reasoning_fields} if meta.reasons else {}
        message = AssistantMessage(
            content=out.content if out.content or not out.tool_calls else None,
            tool_calls=[_tool_call(c) for c in out.tool_calls] or None,
            **reasoning,
        )
        logprobs, reason = chat_logprobs(out.logprobs), choice.finish.reason
        choices.append(ChatChoice(index=out.choice, message=message, logprobs=logprobs, finish_reason=reason))
    return ChatCompletion(id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=answer.usage)


def _deltas(out: Delta, reasoning_fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """OpenAI's streamed pieces: a tool call opens with id, type and name, then its arguments."""
    deltas: list[dict[str, Any]] = []
    if out.reasoning:
        deltas.append({name: out.reasoning for name in reasoning_fields})
    if out.content:
        deltas.append({"content": out.content})
    for index, call in enumerate(out.tool_calls, start=out.calls_before):
        opening = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        deltas.append({"tool_calls": [opening]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
    return deltas


async def chunks(events: AsyncIterator[OutputEvent], meta: ResponseMeta) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(
        choice: int, delta: dict[str, Any], finish_reason: str | None = None, logprobs: ChatLogprobs | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=meta.id,
            created=meta.created,
            model=meta.model,
            choices=[ChatChunkChoice(index=choice, delta=delta, logprobs=logprobs, finish_reason=finish_reason)],
        )

    started: set[int] = set()
    async for event in events:
        if isinstance(event, Done):
            if meta.include_usage:
                yield ChatCompletionChunk(
                    id=meta.id, created=meta.created, model=meta.model, choices=[], usage=event.usage
                )
            continue
        if event.choice not in started:
            # OpenAI opens each choice with the role and an empty content; clients key on it.
            started.add(event.choice)
            yield chunk(event.choice, {"role": "assistant", "content": ""})
        if isinstance(event, Finish):
            yield chunk(event.choice, {}, event.reason)
        elif isinstance(event, Delta):
            deltas = _deltas(event, meta.reasoning_fields)
            logprobs = chat_logprobs(event.logprobs)
            if logprobs and not deltas:
                deltas = [{"content": ""}]  # tokens whose text is still held back: their log probabilities go now
            for delta in deltas:
                yield chunk(event.choice, delta, logprobs=logprobs)
                logprobs = None


SHAPE = Shape("chatcmpl", whole, chunks)
