"""gRPC wiring of the inference service: Generate streams an engine's steps (chat models), Embed
embeds (embedding models), ListModels describes the one model this instance serves. The servicer
speaks to the engine through its interface (engine_api.py), whichever engine serves the model."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio

from services.inference import metrics
from services.inference.embedder import Embedder
from services.inference.engine import Engine
from services.inference.engine_api import GenerationEngine, GenerationRequest, SamplingConfig, Step, TokenLogprob
from services.inference.loader import load_model, load_tokenizer
from services.inference.manifest import ManifestError, verify_manifest
from services.inference.scheduler import EngineLimits
from services.inference.tracing import record_phases
from services.inference.vllm_engine import VllmEngine, WorkerModel
from services.mesh.config import Settings
from services.mesh.contracts import finish_reasons
from services.mesh.contracts.errors import InvalidArgument, WrongModelKind, check_model
from services.mesh.contracts.model_dir import context_length as model_context_length
from services.mesh.contracts.model_dir import model_kind, reasoning_tags, tool_parser, vocab_size
from services.mesh.rpc.server import GrpcService, serve
from services.mesh.stubs import common_pb2, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

# WatchLoad looks at the engine this often and reports when anything changed, and at least this
# often otherwise (so a caller can tell a quiet instance from a lost stream).
LOAD_INTERVAL_S = 0.2
LOAD_HEARTBEAT_S = 5.0
# A vLLM worker loads its model before it answers as healthy; the service waits this long for it.
VLLM_START_TIMEOUT_S = 600.0


def sampling_config(params: common_pb2.SamplingParams) -> SamplingConfig:
    return SamplingConfig(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty or 1.0,
        seed=params.seed if params.HasField("seed") else None,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        ignore_eos=params.ignore_eos,
        logit_bias=tuple(sorted(params.logit_bias.items())),
    )


def _logprob(entry: TokenLogprob, token_text: Callable[[int], str]) -> inference_pb2.TokenLogprob:
    top = [inference_pb2.TopLogprob(token_id=t, token=token_text(t), logprob=lp) for t, lp in entry.top]
    return inference_pb2.TokenLogprob(
        token_id=entry.token_id, token=token_text(entry.token_id), logprob=entry.logprob, top=top
    )


def _chunk(step: Step, token_text: Callable[[int], str]) -> inference_pb2.GenerateChunk:
    chunk = inference_pb2.GenerateChunk(token_ids=step.token_ids, text=step.text)
    chunk.logprobs.extend(_logprob(entry, token_text) for entry in step.logprobs)
    chunk.prompt_logprobs.extend(_logprob(entry, token_text) for entry in step.prompt_logprobs)
    if step.finish_reason:
        chunk.finish_reason = finish_reasons.TO_PROTO[step.finish_reason]
        chunk.usage.prompt_tokens = step.prompt_tokens
        chunk.usage.completion_tokens = step.completion_tokens
        chunk.usage.cached_tokens = step.cached_tokens
    return chunk


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """One model per instance: Generate for a chat model (engine), Embed for an embedding model."""

    def __init__(
        self, info: inference_pb2.ModelInfo, engine: GenerationEngine | None, embedder: Embedder | None
    ) -> None:
        self._info, self._engine, self._embedder = info, engine, embedder

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        check_model(request.model, self._info.id)
        if self._engine is None:
            raise WrongModelKind(f"{self._info.id} is an embedding model: it generates no text", "model")
        remaining = context.time_remaining()
        # Submitting checks every prompt token and may compile a JSON grammar: off the event loop.
        handle = await asyncio.to_thread(
            self._engine.submit,
            GenerationRequest(
                request_id=request.request_id,
                prompt_ids=list(request.token_ids),
                max_tokens=request.sampling.max_tokens,
                sampling=sampling_config(request.sampling),
                stop=tuple(request.sampling.stop),
                top_logprobs=request.sampling.top_logprobs if request.sampling.HasField("top_logprobs") else None,
                json_schema=request.sampling.json_schema if request.sampling.HasField("json_schema") else None,
                prompt_logprobs=(
                    request.sampling.prompt_logprobs if request.sampling.HasField("prompt_logprobs") else None
                ),
            ),
            deadline=None if remaining is None else time.monotonic() + remaining,
        )
        metrics.GENERATE_CALLS.labels(self._engine.name).inc()
        # Fires on cancellation, deadline and completion alike, even while this generator waits to
        # be closed; cancelling a finished sequence is a no-op.
        context.add_done_callback(lambda _: handle.cancel())
        tokens, finish = 0, None
        try:
            async for step in handle.steps():
                tokens, finish = tokens + len(step.token_ids), step.finish_reason
                yield _chunk(step, self._engine.token_text)
        finally:
            handle.cancel()
            record_phases(handle, tokens, finish)
            log.info(
                "generated %d tokens (%s)",
                tokens,
                finish or "cancelled",
                extra={
                    "tokens": tokens,
                    "finish_reason": finish or "cancelled",
                    "prompt_tokens": len(request.token_ids),
                },
            )

    async def WatchLoad(
        self, request: inference_pb2.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.LoadReport]:
        """Until the caller goes away, which cancels this generator."""
        if self._engine is None:
            raise WrongModelKind(f"{self._info.id} is an embedding model: it has no generation load", "model")
        last, sent_at = None, 0.0
        while True:
            load, now = self._engine.load(), time.monotonic()
            if load != last or now - sent_at >= LOAD_HEARTBEAT_S:
                yield inference_pb2.LoadReport(**dataclasses.asdict(load))
                last, sent_at = load, now
            await asyncio.sleep(LOAD_INTERVAL_S)

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedReply:
        check_model(request.model, self._info.id)
        if self._embedder is None:
            raise WrongModelKind(f"{self._info.id} generates text: it has no embeddings", "model")
        if not request.inputs:
            raise InvalidArgument("input must hold at least one item", "input")
        return await asyncio.to_thread(self._embed, self._embedder, request)  # a forward pass: off the loop

    @staticmethod
    def _embed(embedder: Embedder, request: inference_pb2.EmbedRequest) -> inference_pb2.EmbedReply:
        texts = [item.text for item in request.inputs if not item.token_ids]
        tokenized = iter(embedder.tokenize(texts))
        ids = [list(item.token_ids) if item.token_ids else next(tokenized) for item in request.inputs]
        if request.truncate_to:
            ids = [embedder.truncated(item, request.truncate_to) for item in ids]
        result = embedder.embed(ids)
        return inference_pb2.EmbedReply(
            embeddings=[inference_pb2.Embedding(values=v) for v in result.vectors], prompt_tokens=result.prompt_tokens
        )

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsReply:
        return inference_pb2.ListModelsReply(models=[self._info])


def engine_limits(settings: Settings) -> EngineLimits:
    # The settings carry the limits under the same names.
    return EngineLimits(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(EngineLimits)})


def run(settings: Settings, ready_file: Path | None) -> int:
    try:
        verify_manifest(settings.model, settings.allow_missing_manifest, settings.model_manifest)
    except ManifestError as err:
        log.error("refusing to serve %s: %s", settings.model, err)
        return 1
    kind = model_kind(settings.model)
    info = inference_pb2.ModelInfo(
        id=settings.model_name,
        version=settings.served_model_version,
        kind=kind,
        owned_by="sluice",
        created=int(time.time()),
    )
    engine, embedder, live = None, None, lambda: True
    if kind == "embedding":
        embedder = Embedder(settings.model, settings.device)
        info.context_length = embedder.max_tokens
    else:
        engine = _generation_engine(settings, info)
        if engine is None:
            return 1
        live = lambda: not engine.stalled(settings.stall_timeout_s)  # noqa: E731
    servicer = InferenceServicer(info, engine, embedder)
    spec = GrpcService(
        name="inference",
        service_names=[inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name],
        register=lambda server: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server),
        live=live,
        tags=(
            f"model={info.id}",
            *([f"version={info.version}"] if info.version else []),
            f"kind={kind}",
            *([f"engine={settings.engine}"] if kind == "chat" else []),
        ),
    )
    return serve(settings, spec, settings.inference_port, ready_file)


def _generation_engine(settings: Settings, info: inference_pb2.ModelInfo) -> GenerationEngine | None:
    """The engine of a chat model, and what it tells the edge about the model (context length,
    reasoning tags, tool format); None when a vLLM worker never became healthy."""
    if settings.engine == "vllm":
        tokenizer, eos_ids = load_tokenizer(settings.model)
        model = WorkerModel(
            info.id, tokenizer, eos_ids, model_context_length(settings.model), vocab_size(settings.model)
        )
        worker = VllmEngine(settings.vllm_addr, model)
        log.info("waiting for the vLLM worker at %s to be healthy", settings.vllm_addr)
        if not worker.wait_healthy(VLLM_START_TIMEOUT_S):
            log.error("the vLLM worker at %s did not become healthy in %.0fs", settings.vllm_addr, VLLM_START_TIMEOUT_S)
            worker.close()
            return None
        engine: GenerationEngine = worker
        context = model.context_length
    else:
        loaded = load_model(settings.model, settings.device, settings.model_name, settings.dtype)
        tokenizer, context = loaded.tokenizer, loaded.context_length
        # Blocks cached for one build of the weights are never found by prompts for another.
        engine = Engine(loaded, engine_limits(settings), cache_salt=f"{info.id}@{info.version}")
    info.context_length = context
    tags = reasoning_tags(settings.reasoning_tags, tokenizer.get_vocab())
    if tags:
        info.reasoning_open, info.reasoning_close = tags
    info.tool_parser = tool_parser(settings.tool_parser, tokenizer.chat_template) or ""
    return engine
