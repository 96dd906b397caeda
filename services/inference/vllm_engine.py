"""A vLLM worker as the inference service's engine, over vLLM's token-level gRPC protocol
(`vllm serve MODEL --grpc`: the `VllmEngine` service of the smg-grpc-proto package).

The worker generates token ids; this side keeps doing what that protocol leaves to its caller
and what Sluice promises its clients: detokenizing, stop strings and finishing (output.py, as
for the built-in engine), log probabilities as Sluice reports them, and the request's limits.
Sampling maps one to one (temperature, top-p/k, min-p, penalties, logit bias, seed, max
tokens, log probabilities, prompt log probabilities) and structured output becomes vLLM's JSON
schema constraint. What the worker cannot honour is refused before it is sent, naming the field
and the engine. Cancelling a generation cancels its call and aborts the request in the worker.

The worker's health check and load figures are polled on a thread of their own, so `load()` and
the liveness the service reports (SERVING only while the worker is healthy) cost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio
from smg_grpc_proto.generated import vllm_engine_pb2, vllm_engine_pb2_grpc
from transformers import PreTrainedTokenizerBase

from services.inference.detokenize import direct_decoder
from services.inference.engine_api import EngineLoad, GenerationRequest, Step, TokenLogprob
from services.inference.output import SequenceOutput
from services.mesh.contracts.errors import (
    ContextLengthExceeded,
    DeadlineExceeded,
    InvalidArgument,
    MeshError,
    ResourceExhausted,
    Unavailable,
)
from services.mesh.contracts.limits import MAX_TOP_LOGPROBS

log = logging.getLogger(__name__)

ENGINE = "vllm"
INT32 = 2**31 - 1
POLL_S = 0.5  # how often the worker's health and load are asked
# A failed health check is the worker's own verdict (or its death), not a mere absence of progress:
# it takes this service out after a few polls rather than after the whole stall timeout, so the
# edge stops routing to a dead worker within seconds.
UNHEALTHY_AFTER_S = 4 * POLL_S
# A load report in blocks of this many token slots (the worker reports tokens; routing compares shares).
REPORT_BLOCK = 16


@dataclass(frozen=True)
class WorkerModel:
    """What this side needs to know of the model the worker serves (read from the same directory)."""

    model_id: str
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: frozenset[int]
    context_length: int
    vocab_size: int


def request_params(request: GenerationRequest) -> vllm_engine_pb2.SamplingParams:
    """The worker's sampling parameters for `request`, or InvalidArgument for what it cannot take."""
    config = request.sampling
    if config.seed is not None and not -(INT32 + 1) <= config.seed <= INT32:
        raise InvalidArgument(f"seed: the {ENGINE} engine takes 32-bit seeds; {config.seed} is outside them", "seed")
    params = vllm_engine_pb2.SamplingParams(
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=max(0, config.top_k),
        min_p=config.min_p,
        frequency_penalty=config.frequency_penalty,
        presence_penalty=config.presence_penalty,
        repetition_penalty=config.repetition_penalty,
        max_tokens=request.max_tokens,
        ignore_eos=config.ignore_eos,
        n=1,
    )
    if config.seed is not None:
        params.seed = config.seed
    if config.logit_bias:
        params.logit_bias.update(dict(config.logit_bias))
    if request.top_logprobs is not None:
        params.logprobs = request.top_logprobs
    if request.prompt_logprobs is not None:
        params.prompt_logprobs = request.prompt_logprobs
    if request.json_schema is not None:
        params.json_schema = request.json_schema
    return params


def _top(values: Sequence[float], token_ids: Sequence[int], width: int) -> tuple[tuple[int, float], ...]:
    """The worker's alternatives (the sampled token may lead them) as Sluice reports them: the
    `width` most likely, best first."""
    pairs = sorted(zip(token_ids, values, strict=True), key=lambda pair: pair[1], reverse=True)
    return tuple((int(t), float(v)) for t, v in pairs[:width])


def output_logprobs(logprobs: vllm_engine_pb2.OutputLogProbs, width: int) -> list[TokenLogprob]:
    tops = list(logprobs.top_logprobs)
    return [
        TokenLogprob(int(token), float(value), _top(tops[i].values, tops[i].token_ids, width) if i < len(tops) else ())
        for i, (token, value) in enumerate(zip(logprobs.token_ids, logprobs.token_logprobs, strict=True))
    ]


def prompt_logprobs(logprobs: vllm_engine_pb2.InputLogProbs, width: int) -> tuple[TokenLogprob, ...]:
    """One per prompt token; the first, which nothing predicts, with logprob 0 and no alternatives
    (as the built-in engine reports it)."""
    tops = list(logprobs.top_logprobs)
    entries = []
    for i, (token, value) in enumerate(zip(logprobs.token_ids, logprobs.token_logprobs, strict=True)):
        if i == 0 or not value.HasField("value"):
            entries.append(TokenLogprob(int(token), 0.0))
            continue
        top = _top(tops[i].values, tops[i].token_ids, width) if i < len(tops) else ()
        entries.append(TokenLogprob(int(token), float(value.value), top))
    return tuple(entries)


def _mesh_error(err: grpc.aio.AioRpcError) -> MeshError:
    """A failed worker call as this service answers it: the worker's own refusals keep their kind;
    a worker that is down or broken makes this instance unavailable."""
    code, details = err.code(), err.details() or err.code().name
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return InvalidArgument(f"the {ENGINE} engine refused the request: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(f"the {ENGINE} engine is full: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"the {ENGINE} engine did not finish within the deadline")
    return Unavailable(f"the {ENGINE} worker failed ({code.name}); retry shortly")


def _worker_finish(reason: str, generated: int, max_tokens: int) -> str:
    """Why the worker ended a request, as Sluice reports it. A request the worker aborted on its
    own (not this side's cancel, which never reads on) is a failure, never a short answer."""
    if reason == "abort":
        raise Unavailable(f"the {ENGINE} worker aborted the request; retry shortly")
    if reason in ("stop", "length"):
        return reason
    return "length" if generated >= max_tokens else "stop"


@dataclass(eq=False)
class VllmGeneration:
    """A request to the worker, as its reader sees it (engine_api.Generation)."""

    engine: VllmEngine
    request: GenerationRequest
    deadline: float | None
    queued_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    # The worker keys its requests by id, and a request's choices (n, several prompts) share the
    # edge's request id: each generation gets its own, or the worker would merge or cut them.
    worker_request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _cancelled: bool = False
    _call: grpc.aio.UnaryStreamCall | None = None

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def steps(self) -> AsyncIterator[Step]:
        request = self.request
        model = self.engine.model
        output = SequenceOutput(request, self.engine.decoder, model.eos_token_ids, None)
        remaining = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        stub = self.engine.stub()
        call = stub.Generate(
            vllm_engine_pb2.GenerateRequest(
                request_id=self.worker_request_id,
                tokenized=vllm_engine_pb2.TokenizedInput(input_ids=request.prompt_ids),
                sampling_params=request_params(request),
                stream=True,
            ),
            timeout=remaining,
        )
        self._call = call
        self.admitted_at = time.monotonic()
        generated, finish, completed = 0, None, False
        counts = (len(request.prompt_ids), 0, 0)  # prompt, completion, cached, as the worker counts them
        first = True
        try:
            async for reply in call:
                if self._cancelled:
                    return
                if reply.WhichOneof("response") == "complete":
                    completed = True
                    done = reply.complete
                    counts = (done.prompt_tokens, done.completion_tokens, done.cached_tokens)
                    if finish is None:  # the worker ended it (EOS or max_tokens) before this side saw why
                        finish = _worker_finish(done.finish_reason, generated, request.max_tokens)
                        yield Step([], "", finish, counts[0], generated, (), (), counts[2])
                    return
                chunk = reply.chunk
                counts = (chunk.prompt_tokens, chunk.completion_tokens, chunk.cached_tokens)
                step, generated, finish = self._step(chunk, output, generated, counts, first)
                first = False
                if step is not None:
                    yield step
                if finish is not None:
                    return  # a stop string this side matched: the worker is told below
        except grpc.aio.AioRpcError as err:
            if self._cancelled:
                return
            raise _mesh_error(err) from err
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._cancelled and task is not None and not task.cancelling():
                return  # the call this side cancelled (cancel()), not the reader's task: the stream ends
            raise
        finally:
            self.finished_at = self.finished_at or time.monotonic()
            if not completed:  # cancelled, stopped by a stop string, or failed: the worker lets it go
                call.cancel()
                await self.engine.abort(self.worker_request_id)

    def _step(
        self,
        chunk: vllm_engine_pb2.GenerateStreamChunk,
        output: SequenceOutput,
        generated: int,
        counts: tuple[int, int, int],
        first: bool,
    ) -> tuple[Step | None, int, str | None]:
        request = self.request
        now = time.monotonic()
        width = request.top_logprobs or 0
        entries = output_logprobs(chunk.output_logprobs, width) if request.top_logprobs is not None else []
        tokens, text, finish, kept = [], "", None, []
        for i, token in enumerate(chunk.token_ids):
            generated += 1
            tokens.append(int(token))
            if i < len(entries):
                kept.append(entries[i])
            delta, finish = output.add(int(token), generated)
            text += delta
            if finish is not None:
                break
        if tokens and self.first_token_at is None:
            self.first_token_at = now
        scored: tuple[TokenLogprob, ...] = ()
        if first and request.prompt_logprobs is not None:
            scored = prompt_logprobs(chunk.input_logprobs, request.prompt_logprobs)
        if finish is not None:
            self.finished_at = now
        if not tokens and not scored:
            return None, generated, finish
        step = Step(tokens, text, finish, counts[0], generated, tuple(kept), scored, counts[2])
        return step, generated, finish


class VllmEngine:
    name = ENGINE

    def __init__(self, address: str, model: WorkerModel) -> None:
        self.address = address
        self.model = model
        self.decoder = direct_decoder(model.tokenizer)
        self._stub: vllm_engine_pb2_grpc.VllmEngineStub | None = None  # on the serving event loop
        self._healthy = False
        self._healthy_since = time.monotonic()
        self._unhealthy_since: float | None = time.monotonic()
        self._load = EngineLoad(0, 0, 0, 0, 0)
        self._stop = threading.Event()
        threading.Thread(target=self._poll, name="vllm-poll", daemon=True).start()

    # ------------------------------------------------------------------ the GenerationEngine interface

    def submit(self, request: GenerationRequest, deadline: float | None = None) -> VllmGeneration:
        self.validate(request)
        request_params(request)  # what the worker cannot take is refused now, before anything is sent
        return VllmGeneration(self, request, deadline)

    def load(self) -> EngineLoad:
        return self._load

    def stalled(self, after_s: float) -> bool:
        """The worker has not answered its health check as healthy for `after_s` seconds (or
        UNHEALTHY_AFTER_S, when shorter)."""
        since = self._unhealthy_since
        return since is not None and time.monotonic() - since > min(after_s, UNHEALTHY_AFTER_S)

    def token_text(self, token_id: int) -> str:
        return self.model.tokenizer.decode([token_id])

    @property
    def healthy(self) -> bool:
        return self._healthy

    # ------------------------------------------------------------------ requests

    def validate(self, request: GenerationRequest) -> None:
        model = self.model
        if not request.prompt_ids:
            raise InvalidArgument("token_ids must not be empty", "token_ids")
        bad = next((t for t in request.prompt_ids if not 0 <= t < model.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(f"token id {bad} is outside the vocabulary (0..{model.vocab_size - 1})", "token_ids")
        if request.max_tokens < 1:
            raise InvalidArgument("max_tokens must be at least 1", "max_tokens")
        for name, value in (("top_logprobs", request.top_logprobs), ("logprobs", request.prompt_logprobs)):
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise InvalidArgument(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}", name)
        total = len(request.prompt_ids) + request.max_tokens
        if total > model.context_length:
            raise ContextLengthExceeded(
                f"{len(request.prompt_ids)} prompt tokens + max_tokens {request.max_tokens} exceed the "
                f"context length {model.context_length} of {model.model_id}",
                "max_tokens",
            )

    def stub(self) -> vllm_engine_pb2_grpc.VllmEngineStub:
        """The worker's stub on the event loop that calls it (made there on first use)."""
        if self._stub is None:
            self._stub = vllm_engine_pb2_grpc.VllmEngineStub(grpc.aio.insecure_channel(self.address))
        return self._stub

    async def abort(self, request_id: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await self.stub().Abort(vllm_engine_pb2.AbortRequest(request_ids=[request_id]), timeout=2.0)

    # ------------------------------------------------------------------ the worker's state

    def wait_healthy(self, timeout_s: float) -> bool:
        """Block until the worker answers its health check as healthy (True) or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._healthy:
                return True
            time.sleep(0.1)
        return self._healthy

    def _poll(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
            while not self._stop.is_set():
                self._poll_once(stub)
                self._stop.wait(POLL_S)

    def _poll_once(self, stub: vllm_engine_pb2_grpc.VllmEngineStub) -> None:
        try:
            healthy = stub.HealthCheck(vllm_engine_pb2.HealthCheckRequest(), timeout=2.0).healthy
        except grpc.RpcError:
            healthy = False
        if healthy != self._healthy:
            state = "healthy" if healthy else "not healthy"
            log.log(logging.INFO if healthy else logging.ERROR, "vLLM worker at %s is %s", self.address, state)
        self._healthy = healthy
        self._unhealthy_since = None if healthy else (self._unhealthy_since or time.monotonic())
        if not healthy:
            return
        try:
            loads = stub.GetLoads(vllm_engine_pb2.GetLoadsRequest(), timeout=2.0).loads
        except grpc.RpcError:
            return
        waiting = sum(load.num_waiting_reqs for load in loads)
        running = sum(load.num_running_reqs for load in loads)
        total = sum(load.max_total_num_tokens for load in loads) // REPORT_BLOCK
        used = sum(load.num_used_tokens for load in loads) // REPORT_BLOCK
        self._load = EngineLoad(waiting, running, max(0, total - used), total, 0)

    def close(self) -> None:
        self._stop.set()
