"""The generation engine: continuous batching over one worker thread that owns the model.

Every step the worker packs one new token per decoding sequence plus prefill chunks of
newcomers into a single forward pass (see ragged_attention.py), samples each sequence with
its own parameters, and streams the results. Sequences join at any step boundary and leave
the moment they finish or are cancelled, freeing their KV memory.

Limits keep the process bounded under any load: at most `max_running` sequences, at most
`max_batched_tokens` tokens per forward pass, KV reservations within `kv_cache_bytes`, and at
most `max_waiting` queued requests (beyond that, submit fails fast with RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch

from services.inference import metrics
from services.inference.detokenize import IncrementalDetokenizer
from services.inference.loader import LoadedModel
from services.inference.ragged_attention import SequenceKV, StepLayout, install, kv_geometry
from services.inference.sampling import Sampler, SamplingConfig
from services.inference.stopping import StopMatcher
from services.inference.structured import JsonGrammars, JsonMatcher
from services.mesh.errors import ContextLengthExceeded, DeadlineExceeded, InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)

# Linear layers give bitwise-identical rows from 4 rows up (smaller products take other
# kernels), so a step never runs fewer rows: greedy output is the same alone or in a batch.
_MIN_ROWS = 4


@dataclass(frozen=True)
class EngineLimits:
    max_running: int = 32
    max_waiting: int = 256
    max_batched_tokens: int = 512
    prefill_chunk: int = 256
    kv_cache_bytes: int = 1 << 30


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # set: report log probabilities with this many alternatives
    json_schema: str | None = None  # set: the output is JSON matching this schema
    prompt_logprobs: int | None = None  # set: also the prompt tokens' log probabilities, with the first step


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log probability), best first


@dataclass(frozen=True)
class Step:
    """Tokens produced since the previous step and the text they release."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" or "length" on the last step
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when asked for
    # One per prompt token, first step only, when asked for; the first prompt token, which nothing
    # predicts, has logprob 0 and no alternatives.
    prompt_logprobs: tuple[TokenLogprob, ...] = ()

    def then(self, more: Step) -> Step:
        """This step and the next one as one (for a reader that fell behind)."""
        return Step(
            self.token_ids + more.token_ids,
            self.text + more.text,
            more.finish_reason,
            more.prompt_tokens,
            more.completion_tokens,
            self.logprobs + more.logprobs,
            self.prompt_logprobs + more.prompt_logprobs,
        )


@dataclass
class SequenceHandle:
    request: GenerationRequest
    deadline: float | None = None  # time.monotonic() after which a queued request is dropped
    # The sequence's life in time.monotonic() readings, for tracing its phases.
    queued_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    grammar: JsonMatcher | None = None  # the output's grammar state, for structured output
    _steps: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _next(self, block: bool) -> Step | None:
        item = self._steps.get(block=block)
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[Step]:
        """Steps until the finishing one. Steps that piled up while the consumer was busy come
        merged into one, so a slow reader costs one message per read, not one per token."""
        ended = False
        while not ended:
            step = self._next(block=True)
            if step is None:  # cancelled: the sequence left without a finish reason
                return
            while not step.finish_reason:
                try:
                    more = self._next(block=False)
                except queue.Empty:
                    break
                if more is None:
                    ended = True
                    break
                step = step.then(more)
            yield step
            ended = ended or step.finish_reason is not None


@dataclass
class _Sequence:
    handle: SequenceHandle
    kv: SequenceKV
    sampler: Sampler
    detok: IncrementalDetokenizer
    stopper: StopMatcher
    prefilled: int = 0
    generated: int = 0
    last_token: int = -1
    last_token_at: float = 0.0
    # When asked for: each prompt token's after the first, as prefill computes them.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.request.prompt_ids)


class Engine:
    def __init__(self, loaded: LoadedModel, limits: EngineLimits = EngineLimits()) -> None:
        if limits.prefill_chunk > limits.max_batched_tokens - limits.max_running:
            raise ValueError("prefill_chunk must leave room for one decode token per running sequence")
        self.loaded = loaded
        self.limits = limits
        self._vocab_size = loaded.model.get_input_embeddings().weight.shape[0]
        self._geometry = kv_geometry(loaded.model)
        self._kv_dtype = loaded.model.dtype
        self._token_bytes = SequenceKV.bytes_per_token(*self._geometry, self._kv_dtype)
        self._attention = install(loaded.model)
        self._waiting: collections.deque[SequenceHandle] = collections.deque()
        self._wakeup = threading.Condition()
        self._running: list[_Sequence] = []
        self._reserved = 0
        self._last_progress = time.monotonic()
        self._worker = threading.Thread(target=self._run, name="engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ admission

    def validate(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise InvalidArgument("token_ids must not be empty", "token_ids")
        bad = next((t for t in request.prompt_ids if not 0 <= t < self._vocab_size), None)
        if bad is not None:
            raise InvalidArgument(f"token id {bad} is outside the vocabulary (0..{self._vocab_size - 1})", "token_ids")
        if request.max_tokens < 1:
            raise InvalidArgument("max_tokens must be at least 1", "max_tokens")
        if request.top_logprobs is not None and not 0 <= request.top_logprobs <= 20:
            raise InvalidArgument("top_logprobs must be between 0 and 20", "top_logprobs")
        if request.prompt_logprobs is not None and not 0 <= request.prompt_logprobs <= 20:
            raise InvalidArgument("prompt_logprobs must be between 0 and 20", "logprobs")
        biased = next((t for t, _ in request.sampling.logit_bias if not 0 <= t < self._vocab_size), None)
        if biased is not None:
            raise InvalidArgument(f"logit_bias: token id {biased} is outside the vocabulary", "logit_bias")
        total = len(request.prompt_ids) + request.max_tokens
        if total > self.loaded.context_length:
            raise ContextLengthExceeded(
                f"{len(request.prompt_ids)} prompt tokens + max_tokens {request.max_tokens} exceed the "
                f"context length {self.loaded.context_length} of {self.loaded.model_id}",
                "max_tokens",
            )
        if total * self._token_bytes > self.limits.kv_cache_bytes:
            raise ResourceExhausted(
                f"{total} tokens of KV cache exceed this instance's whole budget "
                f"({self.limits.kv_cache_bytes // self._token_bytes} tokens); lower max_tokens",
                "max_tokens",
            )

    @cached_property
    def _json_grammars(self) -> JsonGrammars:
        try:
            return JsonGrammars(self.loaded.tokenizer, self._vocab_size, self.loaded.eos_token_ids)
        except ValueError as err:  # llguidance reads fast (Rust) tokenizers only
            raise InvalidArgument(
                f"response_format: {self.loaded.model_id} cannot constrain its output ({err})", "response_format"
            ) from err

    def _grammar(self, request: GenerationRequest) -> JsonMatcher | None:
        if request.json_schema is None:
            return None
        grammar = self._json_grammars.matcher(request.json_schema)
        if request.max_tokens < grammar.closure_length:
            raise InvalidArgument(
                f"max_tokens {request.max_tokens} is too small for this response_format: "
                f"its shortest JSON takes {grammar.closure_length} tokens",
                "max_tokens",
            )
        return grammar

    def submit(self, request: GenerationRequest, deadline: float | None = None) -> SequenceHandle:
        self.validate(request)
        handle = SequenceHandle(request, deadline, grammar=self._grammar(request))
        with self._wakeup:
            if len(self._waiting) >= self.limits.max_waiting:
                metrics.REJECTED.inc()
                raise ResourceExhausted(f"the queue of {self.limits.max_waiting} waiting requests is full; retry later")
            if not self._waiting and not self._running:
                self._last_progress = time.monotonic()  # an idle engine is not a stalled one
            self._waiting.append(handle)
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            self._wakeup.notify()
        return handle

    def _admit(self) -> None:
        """Move waiting requests into the batch while sequences and KV budget allow, in arrival order."""
        now = time.monotonic()
        with self._wakeup:
            while self._waiting and len(self._running) < self.limits.max_running:
                handle = self._waiting[0]
                if handle.cancelled or (handle.deadline is not None and now >= handle.deadline):
                    self._waiting.popleft()
                    self._drop_queued(handle)
                    continue
                request = handle.request
                capacity = len(request.prompt_ids) + request.max_tokens
                if self._reserved + capacity * self._token_bytes > self.limits.kv_cache_bytes:
                    break  # head-of-line waits for memory: no starvation of large requests
                self._waiting.popleft()
                kv = SequenceKV(*self._geometry, capacity, self._kv_dtype, self.loaded.device)
                self._reserved += kv.nbytes
                self._running.append(
                    _Sequence(
                        handle=handle,
                        kv=kv,
                        sampler=Sampler(request.sampling, self._vocab_size, self.loaded.device),
                        detok=IncrementalDetokenizer(self.loaded.tokenizer),
                        stopper=StopMatcher(list(request.stop)),
                    )
                )
                handle.admitted_at = now
                metrics.SEQUENCES_STARTED.inc()
                metrics.QUEUE_WAIT.observe(now - handle.queued_at)
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            metrics.RUNNING.set(len(self._running))

    def _drop_queued(self, handle: SequenceHandle) -> None:
        if handle.cancelled:
            metrics.SEQUENCES_FINISHED.labels("cancelled").inc()
            handle._steps.put(None)
        else:
            metrics.SEQUENCES_FINISHED.labels("expired").inc()
            handle._steps.put(DeadlineExceeded("the request's deadline passed while it waited in the queue"))

    def _fail(self, seq: _Sequence, err: Exception) -> None:
        seq.handle._steps.put(err)  # raised to the caller reading the steps
        self._release(seq, "error")

    def _release(self, seq: _Sequence, reason: str) -> None:
        seq.handle.finished_at = seq.handle.finished_at or time.monotonic()
        self._running.remove(seq)
        self._reserved -= seq.kv.nbytes
        metrics.SEQUENCES_FINISHED.labels(reason).inc()
        metrics.RUNNING.set(len(self._running))

    # ------------------------------------------------------------------ the loop

    @property
    def running(self) -> int:
        """Sequences in the running batch now."""
        return len(self._running)

    @property
    def kv_reserved_bytes(self) -> int:
        """KV cache memory the running sequences hold now."""
        return self._reserved

    def stalled(self, after_s: float) -> bool:
        """Work is waiting or running, yet the loop has not completed a step for `after_s` seconds:
        a hung engine behind a live process."""
        busy = bool(self._waiting or self._running)
        return busy and time.monotonic() - self._last_progress > after_s

    def _run(self) -> None:
        while True:
            self._last_progress = time.monotonic()
            with self._wakeup:
                while not self._waiting and not self._running:
                    self._wakeup.wait()
            self._admit()
            for seq in [s for s in self._running if s.handle.cancelled]:
                seq.handle._steps.put(None)
                self._release(seq, "cancelled")
            if not self._running:
                continue
            try:
                self._step()
            except Exception as err:  # a failed step fails its sequences, never the worker
                log.exception("engine step failed")
                for seq in list(self._running):
                    self._fail(seq, err)

    def _plan(
        self,
    ) -> tuple[list[int], list[int], StepLayout, list[tuple[_Sequence, int]], list[tuple[_Sequence, int, int]]]:
        """Pack this step's tokens: one per decoding sequence, then prefill chunks within the token
        budget. Also where logits are wanted: the row each sampling sequence samples from, and for
        sequences that asked for their prompt's log probabilities, (row, prompt index it predicts)."""
        ids: list[int] = []
        positions: list[int] = []
        layout = StepLayout()
        sampled: list[tuple[_Sequence, int]] = []  # sequences whose last packed token yields logits
        scored: list[tuple[_Sequence, int, int]] = []
        budget = self.limits.max_batched_tokens
        for seq in self._running:
            if not seq.prefilling:
                layout.slices.append((seq.kv, len(ids), 1))
                sampled.append((seq, len(ids)))
                ids.append(seq.last_token)
                positions.append(seq.kv.length)
                budget -= 1
        for seq in self._running:
            if not seq.prefilling:
                continue
            # A fixed chunk size keeps prefill identical whatever else is running.
            chunk = seq.request.prompt_ids[seq.prefilled : seq.prefilled + self.limits.prefill_chunk]
            if len(chunk) > budget:
                break
            layout.slices.append((seq.kv, len(ids), len(chunk)))
            if seq.request.prompt_logprobs is not None:
                # The row of prompt position i predicts prompt token i + 1 (the last predicts the output).
                last = min(len(chunk), len(seq.request.prompt_ids) - 1 - seq.prefilled)
                scored += [(seq, len(ids) + k, seq.prefilled + k + 1) for k in range(last)]
            ids.extend(chunk)
            positions.extend(range(seq.kv.length, seq.kv.length + len(chunk)))
            seq.prefilled += len(chunk)
            budget -= len(chunk)
            if not seq.prefilling:
                sampled.append((seq, len(ids) - 1))
        return ids, positions, layout, sampled, scored

    @torch.inference_mode()
    def _step(self) -> None:
        ids, positions, layout, sampled, scored = self._plan()
        pad = max(0, _MIN_ROWS - len(ids))
        device = self.loaded.device
        input_ids = torch.tensor([ids + [0] * pad], device=device)
        position_ids = torch.tensor([positions + [0] * pad], device=device)
        rows = [row for _, row in sampled] + [row for _, row, _ in scored]
        rows += [rows[-1] if rows else 0] * max(0, _MIN_ROWS - len(rows))
        self._attention.layout = layout
        out = self.loaded.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=torch.tensor(rows, device=device),
        )
        layout.commit()
        metrics.BATCH_TOKENS.observe(len(ids))
        metrics.BATCH_SEQUENCES.observe(len(layout.slices))
        logits = out.logits[0]
        if scored:
            self._score_prompts(scored, logits[len(sampled) : len(sampled) + len(scored)])
        greedy = [
            i for i, (seq, _) in enumerate(sampled) if seq.request.sampling.plain_greedy and not seq.handle.grammar
        ]
        tokens = dict(zip(greedy, logits[greedy].argmax(dim=-1).tolist(), strict=True)) if greedy else {}
        now = time.monotonic()
        for index, (seq, _) in enumerate(sampled):
            try:
                token = tokens[index] if index in tokens else self._choose(seq, logits[index])
            except Exception as err:  # a sequence whose sampling fails fails alone
                log.exception("sampling failed for %s", seq.request.request_id)
                self._fail(seq, err)
                continue
            wanted = seq.request.top_logprobs
            self._advance(seq, token, now, None if wanted is None else _logprob(logits[index], token, wanted))

    def _score_prompts(self, scored: list[tuple[_Sequence, int, int]], logits: torch.Tensor) -> None:
        """The log probabilities of the prompt tokens these rows predict (one log-softmax and one
        top-k over all of them), kept until the first step."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor([seq.request.prompt_ids[index] for seq, _, index in scored], device=logits.device)
        chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        widest = max(seq.request.prompt_logprobs or 0 for seq, _, _ in scored)
        best = torch.topk(logprobs, widest) if widest else None
        best_ids = best.indices.tolist() if best is not None else [[] for _ in scored]
        best_values = best.values.tolist() if best is not None else [[] for _ in scored]
        for row, (seq, _, index) in enumerate(scored):
            top = seq.request.prompt_logprobs or 0
            alternatives = tuple(zip(best_ids[row][:top], best_values[row][:top], strict=True))
            seq.prompt_logprobs.append(TokenLogprob(seq.request.prompt_ids[index], chosen[row], alternatives))

    def _choose(self, seq: _Sequence, logits: torch.Tensor) -> int:
        grammar = seq.handle.grammar
        if grammar is None:
            return seq.sampler.next_token(logits)
        return grammar.next_token(seq.sampler.next_token, logits, seq.request.max_tokens - seq.generated)

    def _advance(self, seq: _Sequence, token: int, now: float, logprob: TokenLogprob | None = None) -> None:
        seq.sampler.observe(token)
        seq.generated += 1
        metrics.TOKENS_GENERATED.inc()
        if seq.generated == 1:
            seq.handle.first_token_at = now
            metrics.TIME_TO_FIRST_TOKEN.observe(now - seq.handle.queued_at)
            metrics.PROMPT_TOKENS.inc(len(seq.request.prompt_ids))
        else:
            metrics.INTER_TOKEN.observe(now - seq.last_token_at)
        seq.last_token, seq.last_token_at = token, now
        grammar = seq.handle.grammar
        # Structured output ends with its JSON, whatever ignore_eos says.
        eos = token in self.loaded.eos_token_ids and (grammar is not None or not seq.request.sampling.ignore_eos)
        result = seq.stopper.feed("" if eos else seq.detok.add(token))
        if result.stopped or eos or (grammar is not None and grammar.finished):
            finish: str | None = "stop"
        else:
            finish = "length" if seq.generated == seq.request.max_tokens else None
        text = result.text
        if finish and not result.stopped:
            # Generation ended on its own: release what the detokenizer and stop matcher held.
            tail = seq.stopper.feed(seq.detok.finish())
            text += tail.text + ("" if tail.stopped else seq.stopper.flush())
            finish = "stop" if tail.stopped else finish
        if finish:
            seq.handle.finished_at = now  # before the last step is seen
        logprobs = (logprob,) if logprob is not None else ()
        prompt_logprobs: tuple[TokenLogprob, ...] = ()
        if seq.generated == 1 and seq.request.prompt_logprobs is not None:
            # Nothing predicts the prompt's first token: it leads with no log probability.
            prompt_logprobs = (TokenLogprob(seq.request.prompt_ids[0], 0.0), *seq.prompt_logprobs)
        step = Step([token], text, finish, len(seq.request.prompt_ids), seq.generated, logprobs, prompt_logprobs)
        seq.handle._steps.put(step)
        if finish:
            self._release(seq, finish)


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The model's own log probability of the chosen token (before sampling settings) and its `top` best."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    alternatives = tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else ()
    return TokenLogprob(token, float(logprobs[token]), alternatives)
