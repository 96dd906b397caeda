"""/v1/chat/completions: pipeline events → chat.completion and chat.completion.chunk objects.

The generated text passes through the model's reasoning splitter (reasoning models) and tool
call parser (requests with tools) before it becomes content, reasoning_content or tool_calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from services.edge_http.errors import OpenAIError
from services.edge_http.generation import Plan
from services.edge_http.logprobs import chat_logprobs
from services.edge_http.models import Served
from services.edge_http.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    FunctionCall,
    ResponseMeta,
    ToolCallOut,
)
from services.edge_http.pipeline import Pipeline, Run
from services.edge_http.reasoning import ReasoningSplitter
from services.edge_http.tools import ToolCall, ToolMode, forced_prefix, make_parser


@dataclass(frozen=True)
class ChatFlow:
    """/v1/chat/completions: one prompt rendered from the messages by the chat template."""

    body: ChatCompletionRequest
    id_prefix: str = "chatcmpl"

    async def plan(self, pipeline: Pipeline, target: Served, request_id: str) -> Plan:
        tools = tool_mode(self.body, target)
        # Constrained JSON starts at its first byte: no thinking block to split off.
        tags = target.reasoning if self.body.json_schema is None else None
        reply = await pipeline.prepare_chat(self.body, request_id, tags, tools.forced_start if tools else "")
        if reply.reasoning_skipped:
            tags = None  # the template closed the block itself (thinking off): the output is the answer
        return Plan(target, (reply,), self.body.n or 1, tags, reply.reasoning_opened, tools)

    async def whole(self, run: Run, meta: ResponseMeta) -> ChatCompletion:
        return await chat_completion(run, meta)

    def chunks(self, run: Run, meta: ResponseMeta, include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
        return chat_chunks(run, meta, include_usage)


def tool_mode(body: ChatCompletionRequest, target: Served) -> ToolMode | None:
    """How the output carries tool calls, when the request offers tools."""
    if not body.calls_tools:
        return None
    if target.tool_format is None:
        raise OpenAIError(400, f"`{target.id}` does not call tools (its chat template has no tools)", param="tools")
    forced = body.tool_choice == "required" or body.forced_function is not None
    start = forced_prefix(target.tool_format, body.forced_function) if forced else ""
    return ToolMode(target.tool_format, start)


@dataclass
class Shaped:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class OutputShaper:
    """Generated text → reasoning, content and tool calls, piece by piece."""

    def __init__(self, meta: ResponseMeta) -> None:
        self._splitter = ReasoningSplitter(meta.reasoning, meta.reasoning_opened) if meta.reasoning else None
        self._parser = make_parser(meta.tools.format) if meta.tools else None
        self.calls_made = 0
        if self._parser is not None and meta.tools.forced_start:
            self._parser.feed(meta.tools.forced_start)  # the forced start of the call is part of the output

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
    reasoning = {name: shaped.reasoning for name in meta.reasoning_fields} if meta.reasoning else {}
    message = AssistantMessage(
        content=shaped.content if shaped.content or not shaped.calls else None,
        tool_calls=[_tool_call(c) for c in shaped.calls] or None,
        **reasoning,
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


def _deltas(shaped: Shaped, first_index: int, reasoning_fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """OpenAI's streamed pieces: a tool call opens with id, type and name, then its arguments."""
    deltas: list[dict[str, Any]] = []
    if shaped.reasoning:
        deltas.append({name: shaped.reasoning for name in reasoning_fields})
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
        deltas = _deltas(shaper.feed(event.text, final=bool(event.finish_reason)), calls_before, meta.reasoning_fields)
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
