"""The request pipeline behind every completion endpoint: preprocess → cache → inference → cache.

It yields protocol-neutral events; chat.py and completions.py shape them into OpenAI
objects. A run is opened (preprocessed, looked up, first text received) before any
response byte is sent, so every failure up to the first visible token is retried on another
instance or becomes a proper HTTP error.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message

from services.edge_http.errors import OpenAIError, from_rpc_error
from services.edge_http.metrics import UPSTREAM_ERRORS
from services.edge_http.models import Served
from services.edge_http.openai_schema import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    PromptTokensDetails,
    ReasoningTags,
    SamplingFields,
    Usage,
)
from services.edge_http.upstreams import Accept, Upstream, Upstreams
from services.mesh import finish_reasons
from services.mesh.config import Settings
from services.mesh.stubs import (
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    preprocess_pb2,
    preprocess_pb2_grpc,
)
from services.mesh.template_variables import canonical

STUBS = {
    "preprocess": preprocess_pb2_grpc.PreprocessStub,
    "inference": inference_pb2_grpc.InferenceStub,
    "cache": cache_pb2_grpc.CacheStub,
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[inference_pb2.TokenLogprob, ...] = ()  # when the request asked for them
    prompt_logprobs: tuple[inference_pb2.TokenLogprob, ...] = ()  # first event only, when asked for
    cached_tokens: int = 0  # prompt tokens the engine's prefix cache held

    @property
    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
        )


@dataclass
class Run:
    """An opened generation: cache outcome known, first event already received."""

    cache_status: str  # hit, miss, bypass (not deterministic or no-cache), off
    prompt: preprocess_pb2.PreprocessReply = field(repr=False)  # what it generates for
    first: Event
    rest: AsyncIterator[Event] = field(repr=False)
    # Not its prompt's first choice: usage counts the prompt (and what of it was cached) once, by the first.
    shares_prompt: bool = False

    async def events(self) -> AsyncIterator[Event]:
        yield self.first
        async for event in self.rest:
            yield event

    async def collect(self) -> tuple[str, Event, list[inference_pb2.TokenLogprob]]:
        """The whole text, the finishing event and every token's log probability (if asked for),
        for non-streaming responses."""
        text, last, logprobs = "", self.first, []
        async for event in self.events():
            text += event.text
            logprobs += event.logprobs
            last = event
        return text, last, logprobs


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


class Pipeline:
    def __init__(self, upstreams: Upstreams, settings: Settings) -> None:
        self._up = upstreams
        self._settings = settings

    def _metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", request_id),)

    async def _unary(self, service: str, method: str, request: Message, request_id: str, accept: Accept = None) -> Any:
        """A balanced unary call with the mesh's deadline and the request id; the caller decides what a
        failure means."""
        return await self._up.unary(
            service,
            STUBS[service],
            method,
            request,
            accept=accept,
            timeout=self._settings.upstream_timeout_s,
            metadata=self._metadata(request_id),
        )

    async def embed(
        self, target: Served, inputs: list[inference_pb2.EmbedInput], request_id: str, truncate: int | None = None
    ) -> Any:
        """Embeddings of `inputs`; over-long ones cut to `truncate` tokens (-1: the model's limit), or
        by the deployment's default when the request did not say."""
        if truncate is None:
            truncate = -1 if self._settings.embedding_truncate else 0
        request = inference_pb2.EmbedRequest(
            request_id=request_id, model=target.id, inputs=inputs, truncate_to=truncate
        )
        try:
            return await self._unary("inference", "Embed", request, request_id, accept=_serves(target))
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, "inference") from err

    async def prepare_chat(
        self, body: ChatCompletionRequest, request_id: str, tags: ReasoningTags | None, assistant_prefix: str = ""
    ) -> preprocess_pb2.PreprocessReply:
        """The prompt tokens: messages, tools (unless tool_choice is none) and the request's template
        variables through the chat template, then the start of the assistant's turn
        (`assistant_prefix` forces a tool call); the reply tells whether the prompt ends inside the
        model's reasoning block (`tags`) or after one the template closed (thinking off)."""
        request = preprocess_pb2.RenderChatRequest(
            request_id=request_id,
            model=body.model,
            messages=_chat_messages(body),
            sampling=sampling_params(body),
            tools_json=json.dumps([t.model_dump(exclude_none=True) for t in body.tools]) if body.calls_tools else "",
            assistant_prefix=assistant_prefix,
            reasoning_open=tags.open if tags else "",
            reasoning_close=tags.close if tags else "",
            max_tokens_limit=self._settings.max_tokens_limit,
        )
        if variables := body.template_variables:
            request.template_variables_json = canonical(variables)
        return await self._preprocess("RenderChat", request, request_id)

    async def prepare_completion(
        self, body: CompletionRequest, prompt: str | list[int], request_id: str
    ) -> preprocess_pb2.PreprocessReply:
        """One prompt's tokens (a text prompt tokenized, token ids checked)."""
        sampling = sampling_params(body)
        request = preprocess_pb2.TokenizeRequest(
            request_id=request_id, model=body.model, sampling=sampling, max_tokens_limit=self._settings.max_tokens_limit
        )
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.token_ids.extend(prompt)
        return await self._preprocess("Tokenize", request, request_id)

    async def _preprocess(self, method: str, request: Message, request_id: str) -> preprocess_pb2.PreprocessReply:
        try:
            return await self._unary("preprocess", method, request, request_id)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, "preprocess") from err

    async def open(
        self,
        target: Served,
        prepared: preprocess_pb2.PreprocessReply,
        request_id: str,
        no_cache: bool,
        shares_prompt: bool = False,
    ) -> Run:
        """Answer from the cache or start generating on an instance of the chosen model version."""
        # Versions differ in their weights: each caches its own completions.
        key = f"{prepared.cache_key}@{target.version}" if prepared.cache_key else ""
        logprobs = prepared.sampling.HasField("top_logprobs") or prepared.sampling.HasField("prompt_logprobs")
        if not self._settings.cache_enabled:
            status = "off"
        elif not key or no_cache or logprobs:
            status = "bypass"  # the cache keeps text, not log probabilities
        else:
            hit = await self._lookup(key, request_id)
            if hit is not None:
                return Run("hit", prepared, hit, _nothing(), shares_prompt)
            status = "miss"
        rest = self._generate(target, prepared, request_id, key if status == "miss" else "")
        try:
            first = await anext(rest)
        except BaseException:
            await rest.aclose()
            raise
        return Run(status, prepared, first, rest, shares_prompt)

    async def open_choices(
        self,
        target: Served,
        prompts: Sequence[preprocess_pb2.PreprocessReply],
        request_id: str,
        no_cache: bool,
        n: int,
    ) -> list[Run]:
        """`n` runs of each prompt, prompts side by side (choice p * n + i is the i-th of prompt p,
        as OpenAI numbers them); if one fails, the others are closed."""
        return await _together([self._choices(target, prepared, request_id, no_cache, n) for prepared in prompts])

    async def _choices(
        self, target: Served, prepared: preprocess_pb2.PreprocessReply, request_id: str, no_cache: bool, n: int
    ) -> list[Run]:
        """One prompt's `n` runs. The first opens alone: once it has a token, its prompt's KV is in
        the prefix cache of the instance that computed it, and prefix-aware routing sends the others
        there to read it rather than compute it again each."""
        first = await self.open(target, _choice(prepared, 0), request_id, no_cache)
        try:
            others = [self._one(target, _choice(prepared, i), request_id, no_cache) for i in range(1, n)]
            return [first, *await _together(others)]
        except BaseException:
            await first.rest.aclose()
            raise

    async def _one(
        self, target: Served, prepared: preprocess_pb2.PreprocessReply, request_id: str, no_cache: bool
    ) -> list[Run]:
        return [await self.open(target, prepared, request_id, no_cache, shares_prompt=True)]

    async def _lookup(self, key: str, request_id: str) -> Event | None:
        try:
            hit = await self._unary(
                "cache", "Lookup", cache_pb2.LookupRequest(cache_key=key, request_id=request_id), request_id
            )
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                # The cache is an optimisation: its failure must never fail the request.
                UPSTREAM_ERRORS.labels("cache", err.code().name).inc()
                log.warning("cache lookup failed (%s); generating instead", err.code().name)
            return None
        finish = finish_reasons.FROM_PROTO.get(hit.finish_reason, "stop")
        # The usage the completion was generated with: a hit answers exactly what the miss did.
        usage = hit.usage
        return Event(hit.text, finish, usage.prompt_tokens, usage.completion_tokens, cached_tokens=usage.cached_tokens)

    async def _store(self, key: str, completion: cache_pb2.Completion, request_id: str) -> None:
        try:
            await self._unary(
                "cache",
                "Store",
                cache_pb2.StoreRequest(cache_key=key, completion=completion, request_id=request_id),
                request_id,
            )
        except grpc.aio.AioRpcError as err:
            UPSTREAM_ERRORS.labels("cache", err.code().name).inc()
            log.warning("cache store failed (%s)", err.code().name)

    async def _generate(
        self, target: Served, prepared: preprocess_pb2.PreprocessReply, request_id: str, store_as: str
    ) -> AsyncIterator[Event]:
        """The generation's events; with `store_as`, the finished completion is cached under it."""
        chunks = self._up.stream(
            "inference",
            STUBS["inference"],
            "Generate",
            inference_pb2.GenerateRequest(
                request_id=request_id, model=target.id, token_ids=prepared.token_ids, sampling=prepared.sampling
            ),
            accept=_serves(target),
            choose=self._up.by_prefix(list(prepared.token_ids)),
            # A chunk with no text yet (the detokenizer holds a partial character) shows the
            # client nothing, so a failure after it can still be retried elsewhere.
            commits=lambda chunk: bool(chunk.text or chunk.finish_reason),
            timeout=self._settings.generate_timeout_s,
            metadata=self._metadata(request_id),
        )
        # Only a completion that will be cached is gathered (the cache stores text and token ids).
        texts: list[str] = []
        token_ids: list[int] = []
        finished = False
        try:
            async for chunk in chunks:
                if store_as:
                    texts.append(chunk.text)
                    token_ids.extend(chunk.token_ids)
                if not chunk.finish_reason:
                    prompt_logprobs = tuple(chunk.prompt_logprobs)
                    yield Event(chunk.text, logprobs=tuple(chunk.logprobs), prompt_logprobs=prompt_logprobs)
                    continue
                finished = True
                if store_as:
                    completion = cache_pb2.Completion(
                        text="".join(texts), token_ids=token_ids, finish_reason=chunk.finish_reason, usage=chunk.usage
                    )
                    await self._store(store_as, completion, request_id)
                yield Event(
                    chunk.text,
                    finish_reasons.FROM_PROTO[chunk.finish_reason],
                    chunk.usage.prompt_tokens,
                    chunk.usage.completion_tokens,
                    tuple(chunk.logprobs),
                    tuple(chunk.prompt_logprobs),
                    chunk.usage.cached_tokens,
                )
                # The stream ends right after its finishing chunk; reading to its end lets the
                # call (and its trace span) complete normally instead of being cancelled.
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, "inference") from err
        finally:
            await chunks.aclose()  # cancels the call upstream if the client left early
        if not finished:
            raise OpenAIError(502, "inference ended the stream without a finish reason", "server_error")


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
                await run.rest.aclose()
        raise


def _choice(prepared: preprocess_pb2.PreprocessReply, index: int) -> preprocess_pb2.PreprocessReply:
    """Choice `index` of a request: a seeded one samples with seed + index (so the choices differ
    and each reproduces), and each caches under its own key."""
    if index == 0:
        return prepared
    choice = preprocess_pb2.PreprocessReply()
    choice.CopyFrom(prepared)
    if choice.sampling.HasField("seed"):
        choice.sampling.seed = (choice.sampling.seed + index + 2**63) % 2**64 - 2**63  # wraps within int64
    if choice.cache_key:
        choice.cache_key = f"{choice.cache_key}#{index}"
    return choice


def _serves(target: Served) -> Callable[[Upstream], bool]:
    """Instances of exactly the chosen model version."""
    return lambda e: e.info is not None and (e.info.id, e.info.version) == (target.id, target.version)


async def _nothing() -> AsyncIterator[Event]:
    return
    yield  # an empty async generator
