"""gRPC wiring of preprocess: render, tokenize, validate and key each request for one model."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc.aio
from opentelemetry import trace
from prometheus_client import Counter
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.mesh.config import Settings
from services.mesh.contracts.errors import InvalidArgument, check_model
from services.mesh.contracts.model_dir import check_model_dir, context_length
from services.mesh.contracts.template_variables import canonical
from services.mesh.rpc.server import GrpcService, serve
from services.mesh.stubs import common_pb2, preprocess_pb2, preprocess_pb2_grpc
from services.preprocess.cache_keys import cache_key
from services.preprocess.templates import Message, Part, render_chat, template_variables
from services.preprocess.validate import resolve_sampling

log = logging.getLogger(__name__)

REQUESTS = Counter("sluice_preprocess_requests_total", "Preprocess calls by kind", ["kind"])


class PreprocessServicer(preprocess_pb2_grpc.PreprocessServicer):
    def __init__(self, tokenizer: PreTrainedTokenizerBase, model_id: str, context_length: int) -> None:
        self._tokenizer = tokenizer
        self._model_id = model_id
        self._context_length = context_length
        self._vocab_size = len(tokenizer)

    def _reply(
        self, token_ids: list[int], sampling: common_pb2.SamplingParams, limit: int, variables: str = ""
    ) -> preprocess_pb2.PreprocessReply:
        resolved = resolve_sampling(sampling, len(token_ids), self._context_length, limit)
        trace.get_current_span().set_attributes(
            {"gen_ai.request.model": self._model_id, "gen_ai.usage.input_tokens": len(token_ids)}
        )
        return preprocess_pb2.PreprocessReply(
            token_ids=token_ids,
            prompt_tokens=len(token_ids),
            cache_key=cache_key(self._model_id, token_ids, resolved, variables),
            sampling=resolved,
            context_length=self._context_length,
        )

    # Rendering and tokenizing are CPU work: on a thread, so the event loop keeps serving other calls.
    async def RenderChat(
        self, request: preprocess_pb2.RenderChatRequest, context: grpc.aio.ServicerContext
    ) -> preprocess_pb2.PreprocessReply:
        return await asyncio.to_thread(self._render_chat, request)

    async def Tokenize(
        self, request: preprocess_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> preprocess_pb2.PreprocessReply:
        return await asyncio.to_thread(self._tokenize, request)

    def _render_chat(self, request: preprocess_pb2.RenderChatRequest) -> preprocess_pb2.PreprocessReply:
        REQUESTS.labels("chat").inc()
        check_model(request.model, self._model_id)
        messages = [
            Message(m.role, tuple(Part(p.type, p.text) for p in m.content), m.name, m.tool_calls_json, m.tool_call_id)
            for m in request.messages
        ]
        variables = template_variables(request.template_variables_json)
        prompt = render_chat(
            self._tokenizer, messages, self._model_id, request.tools_json, request.assistant_prefix, variables
        )
        # The template already placed any BOS/special tokens the model expects.
        token_ids = self._tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply = self._reply(
            token_ids, request.sampling, request.max_tokens_limit, canonical(variables) if variables else ""
        )
        ending = prompt.rstrip()
        reply.reasoning_opened = bool(request.reasoning_open) and ending.endswith(request.reasoning_open)
        reply.reasoning_skipped = bool(request.reasoning_close) and ending.endswith(request.reasoning_close)
        return reply

    def _tokenize(self, request: preprocess_pb2.TokenizeRequest) -> preprocess_pb2.PreprocessReply:
        REQUESTS.labels("completion").inc()
        check_model(request.model, self._model_id)
        if request.token_ids:
            token_ids = list(request.token_ids)
            outside = next((t for t in token_ids if not 0 <= t < self._vocab_size), None)
            if outside is not None:
                raise InvalidArgument(
                    f"prompt: token id {outside} is outside the vocabulary (0..{self._vocab_size - 1})", "prompt"
                )
            text = self._tokenizer.decode(token_ids)
        else:
            text = request.prompt
            token_ids = self._tokenizer(text, add_special_tokens=True)["input_ids"] if text else []
        reply = self._reply(token_ids, request.sampling, request.max_tokens_limit)
        reply.prompt_text = text
        return reply


def run(settings: Settings, ready_file: Path | None) -> int:
    check_model_dir(settings.model)
    servicer = PreprocessServicer(
        AutoTokenizer.from_pretrained(settings.model), settings.model_name, context_length(settings.model)
    )
    spec = GrpcService(
        name="preprocess",
        service_names=[preprocess_pb2.DESCRIPTOR.services_by_name["Preprocess"].full_name],
        register=lambda server: preprocess_pb2_grpc.add_PreprocessServicer_to_server(servicer, server),
    )
    return serve(settings, spec, settings.preprocess_port, ready_file)
