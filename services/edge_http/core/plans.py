"""A generation request's plan: everything decided about it before it costs anything, decided once
(see docs/design.md, "Where each setting is decided").

The plan holds the model version, each prompt as preprocess resolved it (token ids; sampling with
every default and limit applied, stop strings included; the cache key made from exactly that),
how many choices per prompt, and how the output is read. A chat is one prompt rendered from its
messages by the chat template; a text completion is one prompt per entry of `prompt`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from services.edge_http.core.failures import EdgeError, Failure
from services.edge_http.core.mesh_calls import MeshCalls
from services.edge_http.core.model_versions import Served
from services.edge_http.core.shaping import OutputRules
from services.edge_http.core.tools import ToolMode, forced_prefix
from services.edge_http.openai_schema import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from services.mesh.contracts.template_variables import canonical
from services.mesh.stubs import common_pb2, preprocess_pb2

GenerationRequest = ChatCompletionRequest | CompletionRequest


@dataclass(frozen=True)
class Plan:
    target: Served
    prompts: tuple[preprocess_pb2.PreprocessReply, ...]  # chat: one
    choices: int = 1  # `n`, per prompt
    rules: OutputRules | None = None  # how a chat's output is read (None: text as it is)
    echo: bool = False  # the prompt comes first in each choice's answer

    @property
    def prompt_tokens(self) -> int:
        """Every prompt counted once, as usage reports it."""
        return sum(len(p.token_ids) for p in self.prompts)

    @property
    def most_tokens(self) -> int:
        """What the request may cost at most: its prompts, and every choice at its max_tokens."""
        return self.prompt_tokens + self.choices * sum(p.sampling.max_tokens for p in self.prompts)


async def plan(calls: MeshCalls, body: GenerationRequest, target: Served, request_id: str, max_tokens: int) -> Plan:
    """The plan of a chat or text completion request for the chosen model version; `max_tokens` is
    the deployment's limit per request."""
    if isinstance(body, ChatCompletionRequest):
        return await _plan_chat(calls, body, target, request_id, max_tokens)
    prompts = [calls.tokenize(_tokenize_request(body, p, target.id, request_id, max_tokens)) for p in body.prompts]
    return Plan(target, tuple(await asyncio.gather(*prompts)), body.n or 1, echo=body.echo)


async def _plan_chat(
    calls: MeshCalls, body: ChatCompletionRequest, target: Served, request_id: str, max_tokens: int
) -> Plan:
    tools = tool_mode(body, target)
    # Constrained JSON starts at its first byte: no thinking block to split off.
    tags = target.reasoning if body.json_schema is None else None
    request = preprocess_pb2.RenderChatRequest(
        request_id=request_id,
        model=target.id,
        messages=_chat_messages(body),
        sampling=sampling_params(body),
        tools_json=json.dumps([t.model_dump(exclude_none=True) for t in body.tools]) if body.calls_tools else "",
        # A forced tool call is written into the start of the assistant's turn.
        assistant_prefix=tools.forced_start if tools else "",
        reasoning_open=tags.open if tags else "",
        reasoning_close=tags.close if tags else "",
        max_tokens_limit=max_tokens,
    )
    if variables := body.template_variables:
        request.template_variables_json = canonical(variables)
    reply = await calls.render_chat(request)
    if reply.reasoning_skipped:
        tags = None  # the template closed the block itself (thinking off): the output is the answer
    return Plan(target, (reply,), body.n or 1, OutputRules(tags, reply.reasoning_opened, tools))


def tool_mode(body: ChatCompletionRequest, target: Served) -> ToolMode | None:
    """How the output carries tool calls, when the request offers tools."""
    if not body.calls_tools:
        return None
    if target.tool_format is None:
        raise EdgeError(
            Failure.INVALID, f"`{target.id}` does not call tools (its chat template has no tools)", param="tools"
        )
    forced = body.tool_choice == "required" or body.forced_function is not None
    start = forced_prefix(target.tool_format, body.forced_function) if forced else ""
    return ToolMode(target.tool_format, start)


def _tokenize_request(
    body: CompletionRequest, prompt: str | list[int], model: str, request_id: str, max_tokens: int
) -> preprocess_pb2.TokenizeRequest:
    """One prompt to tokenize (text) or check (token ids)."""
    request = preprocess_pb2.TokenizeRequest(
        request_id=request_id, model=model, sampling=sampling_params(body), max_tokens_limit=max_tokens
    )
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.token_ids.extend(prompt)
    return request


def sampling_params(body: SamplingFields) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        max_tokens=body.max_tokens or 0,  # 0: preprocess fits it to the context
        stop=body.stop_list,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        ignore_eos=body.ignore_eos,
    )
    if body.seed is not None:
        params.seed = body.seed
    if body.wanted_logprobs is not None:
        params.top_logprobs = body.wanted_logprobs
    if body.json_schema is not None:
        params.json_schema = body.json_schema
    if body.wanted_prompt_logprobs is not None:
        params.prompt_logprobs = body.wanted_prompt_logprobs
    params.logit_bias.update({int(token): bias for token, bias in (body.logit_bias or {}).items()})
    return params


def _tool_calls_json(message: ChatMessage) -> str:
    calls = [c.model_dump() for c in message.tool_calls or () if c.function is not None]
    return json.dumps(calls) if calls else ""


def _chat_messages(body: ChatCompletionRequest) -> list[preprocess_pb2.ChatMessage]:
    messages = []
    for message in body.messages:
        out = preprocess_pb2.ChatMessage(
            role=message.role,
            name=message.name or "",
            tool_call_id=message.tool_call_id or "",
            tool_calls_json=_tool_calls_json(message),
        )
        if isinstance(message.content, str):
            out.content.add(type="text", text=message.content)
        elif message.content is not None:
            for part in message.content:
                out.content.add(
                    type=part.type, text=part.text or "", image_url=part.image_url.url if part.image_url else ""
                )
        messages.append(out)
    return messages
