"""/v1/chat/completions: pipeline events → chat.completion and chat.completion.chunk objects.

The generated text passes through the model's reasoning splitter (reasoning models) and tool
call parser (requests with tools) before it becomes content, reasoning_content or tool_calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from services.edge_http.logprobs import chat_logprobs
from services.edge_http.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    FunctionCall,
    ResponseMeta,
    ToolCallOut,
)
from services.edge_http.pipeline import Run
from services.edge_http.reasoning import ReasoningSplitter
from services.edge_http.tools import ToolCall, make_parser


@dataclass
class Shaped:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class OutputShaper:
    """Generated text → reasoning, content and tool calls, piece by piece."""

    def __init__(self, meta: ResponseMeta) -> None:
        self._splitter = ReasoningSplitter(*meta.reasoning, meta.reasoning_opened) if meta.reasoning else None
        self._parser = make_parser(meta.tools[0]) if meta.tools else None
        self.calls_made = 0
        if self._parser is not None and meta.tools[1]:
            self._parser.feed(meta.tools[1])  # the forced start of the call is part of the output

    def feed(self, text: str, final: bool = False) -> Shaped:
        out = Shaped()
        parts = [self._splitter.feed(text), *([self._splitter.finish()] if final else [])] if self._splitter else []
        answer = "".join(p.content for p in parts) if self._splitter else text
        out.reasoning = "".join(p.reasoning for p in parts)
        if self._parser is None:
            out.content = answer
            return out
        for parsed in (self._parser.feed(answer), *([self._parser.finish()] if final else [])):
            out.content += parsed.content
            out.calls += parsed.calls
        self.calls_made += len(out.calls)
        return out

    def finish_reason(self, reason: str | None) -> str:
        return "tool_calls" if self.calls_made else (reason or "stop")


def _tool_call(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


async def chat_completion(run: Run, meta: ResponseMeta) -> ChatCompletion:
    text, last, logprobs = await run.collect()
    shaper = OutputShaper(meta)
    shaped = shaper.feed(text, final=True)
    message = AssistantMessage(
        content=shaped.content if shaped.content or not shaped.calls else None,
        reasoning_content=shaped.reasoning if meta.reasoning else None,
        tool_calls=[_tool_call(c) for c in shaped.calls] or None,
    )
    return ChatCompletion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[
            ChatChoice(
                message=message,
                logprobs=chat_logprobs(logprobs),
                finish_reason=shaper.finish_reason(last.finish_reason),
            )
        ],
        usage=last.usage,
    )


def _deltas(shaped: Shaped, first_index: int) -> list[dict[str, Any]]:
    """OpenAI's streamed pieces: a tool call opens with id, type and name, then its arguments."""
    deltas: list[dict[str, Any]] = []
    if shaped.reasoning:
        deltas.append({"reasoning_content": shaped.reasoning})
    if shaped.content:
        deltas.append({"content": shaped.content})
    for index, call in enumerate(shaped.calls, start=first_index):
        opening = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        deltas.append({"tool_calls": [opening]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
    return deltas


async def chat_chunks(run: Run, meta: ResponseMeta, include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(
        delta: dict[str, Any], finish_reason: str | None = None, logprobs: ChatLogprobs | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=meta.id,
            created=meta.created,
            model=meta.model,
            choices=[ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish_reason)],
        )

    # OpenAI opens with the role and an empty content; clients key on it.
    yield chunk({"role": "assistant", "content": ""})
    shaper = OutputShaper(meta)
    async for event in run.events():
        calls_before = shaper.calls_made
        deltas = _deltas(shaper.feed(event.text, final=bool(event.finish_reason)), calls_before)
        logprobs = chat_logprobs(event.logprobs)
        if logprobs and not deltas:
            deltas = [{"content": ""}]  # tokens whose text is still held back: their log probabilities go now
        for delta in deltas:
            yield chunk(delta, logprobs=logprobs)
            logprobs = None
        if event.finish_reason:
            yield chunk({}, shaper.finish_reason(event.finish_reason))
            if include_usage:
                yield ChatCompletionChunk(
                    id=meta.id, created=meta.created, model=meta.model, choices=[], usage=event.usage
                )
