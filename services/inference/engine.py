"""The generation engine: continuous batching over one worker thread that owns the model.

Every step the worker packs one new token per decoding sequence plus prefill chunks of
newcomers into a single forward pass (see paged_attention.py), samples every sequence in one
batched pass with its own parameters (sampling.py), and streams the results. Sequences join at
any step boundary and leave the moment they finish or are cancelled, freeing their KV blocks.

KV memory is paged: a sequence holds blocks for what it has computed and takes another block
when it grows into it. When none is free, the newest running sequence is preempted: its blocks
go back, and it later recomputes its prompt and output so far and carries on with the same
sampler state, so its tokens are unchanged.

Full blocks are indexed by the hash chain of their tokens (prefix_cache.py): a request whose
prompt starts like one computed before holds those blocks and prefills only the rest, and a
preempted sequence finds its own blocks again unless they were evicted meanwhile.

Limits keep the process bounded under any load: at most `max_running` sequences, at most
`max_batched_tokens` tokens per forward pass, KV blocks within `kv_cache_bytes`, and at most
`max_waiting` queued requests (beyond that, submit fails fast with RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch

from services.inference import metrics
from services.inference.detokenize import IncrementalDetokenizer, direct_decoder
from services.inference.loader import LoadedModel
from services.inference.loop_waker import LoopWaker
from services.inference.paged_attention import (
    BlockPool,
    DecodeGroup,
    KVPool,
    PrefillSlice,
    SequenceBlocks,
    StepLayout,
    decode_group,
    install,
    kv_geometry,
)
from services.inference.prefix_cache import BlockCache
from services.inference.sampling import Sampler, SamplingConfig, sample
from services.inference.stopping import StopMatcher
from services.inference.structured import JsonGrammars, JsonMatcher
from services.mesh.contracts.errors import ContextLengthExceeded, DeadlineExceeded, InvalidArgument, ResourceExhausted
from services.mesh.contracts.limits import MAX_TOP_LOGPROBS
from services.mesh.contracts.prefix_hash import BlockHash, block_hashes, root_hash

log = logging.getLogger(__name__)

# With batch_invariant on: linear layers give bitwise-identical rows from 4 rows up (smaller
# products take other kernels), so a step never runs fewer rows, and decoding rows attend in
# groups of one padded length per this many positions, so a row's arithmetic never depends
# on what else is in the batch: greedy output is the same alone or in a batch.
_INVARIANT_ROWS = 4
_INVARIANT_SPAN = 64


@dataclass(frozen=True)
class EngineLimits:
    max_running: int = 32
    max_waiting: int = 256
    max_batched_tokens: int = 512
    prefill_chunk: int = 256
    kv_cache_bytes: int = 1 << 30
    kv_block_size: int = 16
    batch_invariant: bool = False
    prefix_caching: bool = True


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
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (last step)

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
            more.cached_tokens,
        )


@dataclass(frozen=True)
class EngineLoad:
    """What the engine is doing now (reported to the edge for routing)."""

    waiting: int  # queued requests, and preempted sequences waiting to resume
    running: int
    kv_blocks_free: int
    kv_blocks_total: int
    prefix_cached_blocks: int


@dataclass(eq=False)
class SequenceHandle:
    request: GenerationRequest
    deadline: float | None = None  # time.monotonic() after which a queued request is dropped
    # The sequence's life in time.monotonic() readings, for tracing its phases.
    queued_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    grammar: JsonMatcher | None = None  # the output's grammar state, for structured output
    # Its prompt's block hashes, computed once: a request waiting for memory is tried every step.
    prompt_hashes: list[BlockHash] = field(default_factory=list)
    _steps: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _wake: Callable[[], None] | None = None  # an event-loop reader's wake-up (see `steps`)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _put(self, item: Step | BaseException | None) -> None:
        """Deliver a step, the end of a cancelled sequence (None) or its failure (from the engine thread)."""
        self._steps.put(item)
        wake = self._wake
        if wake is not None:
            wake()

    def _next(self, block: bool) -> Step | None:
        item = self._steps.get(block=block)
        if isinstance(item, BaseException):
            raise item
        return item

    def _merged(self, step: Step) -> tuple[Step, bool]:
        """`step` with the steps that piled up behind it while the reader was busy, so a slow reader
        costs one message per read, not one per token; and whether the sequence has ended."""
        while not step.finish_reason:
            try:
                more = self._next(block=False)
            except queue.Empty:
                break
            if more is None:
                return step, True
            step = step.then(more)
        return step, step.finish_reason is not None

    def __iter__(self) -> Iterator[Step]:
        """Steps until the finishing one (a cancelled sequence ends without one), for a reader on a thread."""
        ended = False
        while not ended:
            step = self._next(block=True)
            if step is None:
                return
            step, ended = self._merged(step)
            yield step

    async def steps(self) -> AsyncIterator[Step]:
        """The same steps for a reader on an event loop, which waits without holding a thread: the
        engine thread wakes the loop when it delivers. A handle has one reader."""
        ready = asyncio.Event()
        waker = LoopWaker.of(asyncio.get_running_loop())
        self._wake = lambda: waker.wake(ready)
        ended = False
        while not ended:
            ready.clear()  # before looking, so a step delivered after the look sets it again
            try:
                step = self._next(block=False)
            except queue.Empty:
                await ready.wait()
                continue
            if step is None:
                return
            step, ended = self._merged(step)
            yield step


@dataclass(eq=False)  # identity: sequences are found and removed in lists by who they are
class _Sequence:
    handle: SequenceHandle
    kv: SequenceBlocks
    sampler: Sampler
    detok: IncrementalDetokenizer
    stopper: StopMatcher
    order: int  # admission order: preemption takes the newest first, re-admission the oldest
    target: int  # tokens to prefill: the prompt, or after a preemption the prompt and output so far
    hashes: list[BlockHash] = field(default_factory=list)  # of its full blocks' tokens, as far as known
    indexed: int = 0  # its first blocks findable in the prefix cache
    cached_tokens: int = 0  # prompt tokens matched in the prefix cache when first admitted
    prefilled: int = 0
    output_ids: list[int] = field(default_factory=list)
    last_token_at: float = 0.0
    # When asked for: each prompt token's after the first, as prefill computes them.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def generated(self) -> int:
        return len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < self.target

    def context(self, start: int, stop: int) -> list[int]:
        """Tokens start..stop-1 of the prompt followed by the output."""
        prompt = self.request.prompt_ids
        return (prompt[start:stop] if start < len(prompt) else []) + self.output_ids[
            max(0, start - len(prompt)) : max(0, stop - len(prompt))
        ]


@dataclass
class _StepPlan:
    """One forward pass: the packed tokens, where their keys and values go, which rows yield
    logits, and which sequences grow by how many positions."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    writes: list[int] = field(default_factory=list)
    decode: list[DecodeGroup] = field(default_factory=list)
    prefill: list[PrefillSlice] = field(default_factory=list)
    grown: list[tuple[_Sequence, int]] = field(default_factory=list)
    sampled: list[tuple[_Sequence, int]] = field(default_factory=list)  # (sequence, row of its logits)
    scored: list[tuple[_Sequence, int, int]] = field(default_factory=list)  # (sequence, row, prompt index)


class Engine:
    def __init__(self, loaded: LoadedModel, limits: EngineLimits = EngineLimits(), cache_salt: str = "") -> None:
        """`cache_salt` names the weights (model and version): cached blocks are only found again
        by prompts for the same ones."""
        if limits.prefill_chunk > limits.max_batched_tokens - limits.max_running:
            raise ValueError("prefill_chunk must leave room for one decode token per running sequence")
        self.loaded = loaded
        self.limits = limits
        self._vocab_size = loaded.model.get_input_embeddings().weight.shape[0]
        self._decoder = direct_decoder(loaded.tokenizer)  # chosen once: every sequence decodes with it
        geometry = kv_geometry(loaded.model)
        self._block_bytes = geometry.bytes_per_token(loaded.model.dtype) * limits.kv_block_size
        blocks = limits.kv_cache_bytes // self._block_bytes
        if blocks < 1:
            raise ValueError(f"kv_cache_bytes must hold at least one block of {self._block_bytes} bytes")
        self._blocks = BlockCache(BlockPool(blocks), limits.prefix_caching, lambda _: metrics.PREFIX_EVICTIONS.inc())
        self._root = root_hash(cache_salt or loaded.model_id)
        # Admitting a prompt leaves this many blocks for running sequences to grow into.
        self._headroom = blocks // 100
        self._attention = install(loaded.model)
        self._pool = KVPool(geometry, blocks, limits.kv_block_size, loaded.model.dtype, loaded.device)
        self._attention.pool = self._pool
        self._waiting: collections.deque[SequenceHandle] = collections.deque()
        self._wakeup = threading.Condition()
        self._running: list[_Sequence] = []
        self._preempted: list[_Sequence] = []  # oldest first; re-admitted before anything waiting
        self._admissions = itertools.count()
        self._last_progress = time.monotonic()
        self._publish()
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
        if request.top_logprobs is not None and not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
        if request.prompt_logprobs is not None and not 0 <= request.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "logprobs")
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
        capacity = self._blocks.count * self.limits.kv_block_size
        if total > capacity:
            raise ResourceExhausted(
                f"{total} tokens of KV cache exceed this instance's whole budget ({capacity} tokens); lower max_tokens",
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

    def _reserve(self, seq: _Sequence) -> bool:
        """Give the sequence blocks for everything it is about to prefill, if the pool allows: the
        cached blocks its tokens start with, and fresh ones for the rest."""
        size = self.limits.kv_block_size
        matched: list[int] = []
        if seq.request.prompt_logprobs is None:  # scoring the prompt needs every position's logits
            # The last token is always computed: its logits choose the next one.
            matched = self._blocks.match(seq.hashes[: (seq.target - 1) // size])
        missing = seq.kv.missing(seq.target) - len(matched)
        headroom = self._headroom if self._running else 0
        if missing + headroom > self._blocks.free - self._blocks.idle_among(matched):
            return False
        self._blocks.hold(matched)
        seq.kv.blocks = matched + self._take(missing)
        seq.kv.length = seq.prefilled = len(matched) * size
        seq.indexed = len(matched)
        return True

    def _admit(self) -> None:
        """Move preempted sequences back, then waiting requests, into the batch while sequences and
        KV blocks allow, in arrival order (the head waits for memory: large requests never starve)."""
        now = time.monotonic()
        with self._wakeup:
            self._sweep_waiting(now)
            while self._preempted and len(self._running) < self.limits.max_running:
                if not self._reserve(self._preempted[0]):
                    break
                self._running.append(self._preempted.pop(0))
            while not self._preempted and self._waiting and len(self._running) < self.limits.max_running:
                handle = self._waiting[0]
                request = handle.request
                seq = _Sequence(
                    handle=handle,
                    kv=SequenceBlocks(self.limits.kv_block_size),
                    sampler=Sampler(request.sampling, self._vocab_size, self.loaded.device),
                    detok=IncrementalDetokenizer(self._decoder),
                    stopper=StopMatcher(list(request.stop)),
                    order=next(self._admissions),
                    target=len(request.prompt_ids),
                )
                if self._blocks.enabled:
                    if not handle.prompt_hashes:
                        handle.prompt_hashes = block_hashes(request.prompt_ids, self.limits.kv_block_size, self._root)
                    seq.hashes = handle.prompt_hashes  # never changed in place: _index builds a new list
                if not self._reserve(seq):
                    break
                seq.cached_tokens = seq.kv.length
                if self._blocks.enabled:
                    metrics.PREFIX_LOOKUPS.inc()
                    metrics.PREFIX_QUERY_TOKENS.inc(len(request.prompt_ids))
                    metrics.PREFIX_HIT_TOKENS.inc(seq.cached_tokens)
                self._waiting.popleft()
                self._running.append(seq)
                handle.admitted_at = now
                metrics.SEQUENCES_STARTED.inc()
                metrics.QUEUE_WAIT.observe(now - handle.queued_at)
        self._publish()

    def _sweep_waiting(self, now: float) -> None:
        """Queued requests that were cancelled or whose deadline passed leave now, wherever they
        wait in the queue: their callers are answered at once, not when a slot frees up."""
        gone = [h for h in self._waiting if h.cancelled or (h.deadline is not None and now >= h.deadline)]
        for handle in gone:
            self._waiting.remove(handle)
            self._drop_queued(handle)

    def _take(self, count: int) -> list[int]:
        blocks = self._blocks.take(count)
        self._pool.clear(blocks)
        return blocks

    def _preempt(self, seq: _Sequence) -> None:
        """Take the sequence out of the batch and give its blocks back; it recomputes later."""
        self._running.remove(seq)
        self._blocks.release(seq.kv.blocks)
        seq.kv = SequenceBlocks(self.limits.kv_block_size)
        seq.prefilled, seq.indexed, seq.target = 0, 0, len(seq.request.prompt_ids) + seq.generated
        seq.prompt_logprobs.clear()  # a sequence preempted mid-prompt scores its prompt again
        self._preempted.append(seq)
        self._preempted.sort(key=lambda s: s.order)
        metrics.PREEMPTIONS.inc()

    def _drop_queued(self, handle: SequenceHandle) -> None:
        if handle.cancelled:
            metrics.SEQUENCES_FINISHED.labels("cancelled").inc()
            handle._put(None)
        else:
            metrics.SEQUENCES_FINISHED.labels("expired").inc()
            handle._put(DeadlineExceeded("the request's deadline passed while it waited in the queue"))

    def _fail(self, seq: _Sequence, err: Exception) -> None:
        seq.handle._put(err)  # raised to the caller reading the steps
        self._release(seq, "error")

    def _release(self, seq: _Sequence, reason: str) -> None:
        seq.handle.finished_at = seq.handle.finished_at or time.monotonic()
        (self._running if seq in self._running else self._preempted).remove(seq)
        self._blocks.release(seq.kv.blocks)
        seq.kv.blocks = []
        metrics.SEQUENCES_FINISHED.labels(reason).inc()
        self._publish()

    def _publish(self) -> None:
        metrics.QUEUE_DEPTH.set(len(self._waiting))
        metrics.RUNNING.set(len(self._running))
        metrics.KV_BLOCKS.labels("used").set(self._blocks.used)
        metrics.KV_BLOCKS.labels("free").set(self._blocks.free)
        metrics.PREFIX_CACHED_BLOCKS.set(self._blocks.cached)

    # ------------------------------------------------------------------ the loop

    @property
    def running(self) -> int:
        """Sequences in the running batch now."""
        return len(self._running)

    @property
    def kv_blocks_used(self) -> int:
        """KV blocks the engine's sequences hold now."""
        return self._blocks.used

    @property
    def kv_blocks_total(self) -> int:
        return self._blocks.count

    def load(self) -> EngineLoad:
        return EngineLoad(
            waiting=len(self._waiting) + len(self._preempted),
            running=len(self._running),
            kv_blocks_free=self._blocks.free,
            kv_blocks_total=self._blocks.count,
            prefix_cached_blocks=self._blocks.cached,
        )

    def stalled(self, after_s: float) -> bool:
        """Work is waiting or running, yet the loop has not completed a step for `after_s` seconds:
        a hung engine behind a live process."""
        busy = bool(self._waiting or self._running or self._preempted)
        return busy and time.monotonic() - self._last_progress > after_s

    def _run(self) -> None:
        while True:
            self._last_progress = time.monotonic()
            with self._wakeup:
                while not self._waiting and not self._running and not self._preempted:
                    self._wakeup.wait()
            for seq in [s for s in self._running + self._preempted if s.handle.cancelled]:
                seq.handle._put(None)
                self._release(seq, "cancelled")
            self._admit()
            if not self._running:
                continue
            try:
                self._step()
            except Exception as err:  # a failed step fails its sequences, never the worker
                log.exception("engine step failed")
                for seq in list(self._running):
                    self._fail(seq, err)

    def _grow(self) -> None:
        """Give every decoding sequence room for this step's token, oldest first; when blocks run
        out, preempt the newest sequence (possibly the one growing)."""
        for seq in sorted(self._running, key=lambda s: s.order):
            if seq.prefilling or seq not in self._running:
                continue
            missing = seq.kv.missing(seq.kv.length + 1)
            if not missing:  # most steps: the token fits in the last block
                continue
            while missing > self._blocks.free:
                newest = max(self._running, key=lambda s: s.order)
                self._preempt(newest)
                if newest is seq:
                    break
            else:
                seq.kv.blocks += self._take(missing)

    def _plan(self) -> _StepPlan:
        """Pack this step's tokens: one per decoding sequence, then prefill chunks within the token
        budget. Also where logits are wanted: the row each sampling sequence samples from, and for
        sequences that asked for their prompt's log probabilities, (row, prompt index it predicts)."""
        plan = _StepPlan()
        device = self.loaded.device
        decoding = [s for s in self._running if not s.prefilling]
        spans: dict[int, list[_Sequence]] = {}
        for seq in decoding:
            span = self._span(seq.kv.length + 1)
            spans.setdefault(span, []).append(seq)
        for span, group in sorted(spans.items()):
            length = span or max(s.kv.length + 1 for s in group)
            plan.decode.append(decode_group(len(plan.ids), [s.kv for s in group], length, device))
            for seq in group:
                plan.sampled.append((seq, len(plan.ids)))
                plan.ids.append(seq.output_ids[-1])
                plan.positions.append(seq.kv.length)
                plan.writes += seq.kv.slots(seq.kv.length, seq.kv.length + 1)
                plan.grown.append((seq, 1))
        budget = self.limits.max_batched_tokens - len(plan.ids)
        for seq in self._running:
            if not seq.prefilling:
                continue
            # A fixed chunk size keeps prefill identical whatever else is running.
            chunk = seq.context(seq.prefilled, min(seq.target, seq.prefilled + self.limits.prefill_chunk))
            if len(chunk) > budget:
                break
            past, start = seq.kv.length, len(plan.ids)
            slots = torch.tensor(seq.kv.slots(0, past + len(chunk)) if past else [], dtype=torch.long, device=device)
            plan.prefill.append(PrefillSlice(start, len(chunk), past, slots))
            if seq.request.prompt_logprobs is not None and seq.generated == 0:
                # The row of prompt position i predicts prompt token i + 1 (the last predicts the output).
                last = min(len(chunk), len(seq.request.prompt_ids) - 1 - seq.prefilled)
                plan.scored += [(seq, start + k, seq.prefilled + k + 1) for k in range(last)]
            plan.ids.extend(chunk)
            plan.positions.extend(range(past, past + len(chunk)))
            plan.writes += seq.kv.slots(past, past + len(chunk))
            plan.grown.append((seq, len(chunk)))
            seq.prefilled += len(chunk)
            budget -= len(chunk)
            if not seq.prefilling:
                plan.sampled.append((seq, len(plan.ids) - 1))
        return plan

    def _index(self, seq: _Sequence) -> None:
        """Make the sequence's newly filled blocks findable by their tokens (output included: the
        next turn of a conversation starts with this one's answer)."""
        size = self.limits.kv_block_size
        full = seq.kv.length // size
        if not self._blocks.enabled or full <= seq.indexed:
            return
        if len(seq.hashes) < full:
            seq.hashes = block_hashes(seq.context(0, full * size), size, self._root, seq.hashes)
        for index in range(seq.indexed, full):
            self._blocks.register(seq.kv.blocks[index], seq.hashes[index])
        seq.indexed = full

    def _span(self, length: int) -> int:
        """The padded attention length of a decoding row in batch-invariant mode (0: one group)."""
        return math.ceil(length / _INVARIANT_SPAN) * _INVARIANT_SPAN if self.limits.batch_invariant else 0

    @torch.inference_mode()
    def _step(self) -> None:
        self._grow()
        if not self._running:
            return
        plan = self._plan()
        minimum = _INVARIANT_ROWS if self.limits.batch_invariant else 1
        pad = max(0, minimum - len(plan.ids))
        device = self.loaded.device
        input_ids = torch.tensor([plan.ids + [0] * pad], device=device)
        position_ids = torch.tensor([plan.positions + [0] * pad], device=device)
        rows = [row for _, row in plan.sampled] + [row for _, row, _ in plan.scored]
        rows += [rows[-1] if rows else 0] * max(0, minimum - len(rows))
        writes = torch.tensor(plan.writes, dtype=torch.long, device=device)
        self._attention.layout = StepLayout(writes, plan.decode, plan.prefill)
        out = self.loaded.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=torch.tensor(rows, device=device),
        )
        for seq, count in plan.grown:
            seq.kv.length += count
            self._index(seq)
        metrics.BATCH_TOKENS.observe(len(plan.ids))
        metrics.BATCH_SEQUENCES.observe(len(plan.grown))
        logits = out.logits[0]
        sampled = plan.sampled
        if plan.scored:
            scored = logits[len(sampled) : len(sampled) + len(plan.scored)]
            prompt_ids = [seq.request.prompt_ids[index] for seq, _, index in plan.scored]
            widths = [seq.request.prompt_logprobs or 0 for seq, _, _ in plan.scored]
            for (seq, _, _), entry in zip(plan.scored, _logprobs(scored, prompt_ids, widths), strict=True):
                seq.prompt_logprobs.append(entry)
        tokens = self._sample([seq for seq, _ in sampled], logits[: len(sampled)])
        wanted = [i for i, (seq, _) in enumerate(sampled) if seq.request.top_logprobs is not None]
        logprobs: dict[int, TokenLogprob] = {}
        if wanted:
            widths = [sampled[i][0].request.top_logprobs or 0 for i in wanted]
            entries = _logprobs(logits[wanted], [tokens[i] for i in wanted], widths)
            logprobs = dict(zip(wanted, entries, strict=True))
        now = time.monotonic()
        with LoopWaker.deliveries():
            for index, (seq, _) in enumerate(sampled):
                if tokens[index] is not None:
                    self._advance(seq, tokens[index], now, logprobs.get(index))
        produced = sum(token is not None for token in tokens)
        metrics.TOKENS_GENERATED.inc(produced)  # once per step: each update takes a lock
        metrics.TOKEN_RATE.add(produced)
        self._publish()

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int | None]:
        """Each sequence's next token: one batched pass for all but those under a grammar, which
        choose among the tokens it allows, each on its own. None for a sequence that failed."""
        free = [i for i, seq in enumerate(seqs) if seq.handle.grammar is None]
        tokens: list[int | None] = [None] * len(seqs)
        if free:
            rows = logits if len(free) == len(seqs) else logits[free]  # indexing would copy them all
            picked = sample([seqs[i].sampler for i in free], rows)
            for i, token in zip(free, picked, strict=True):
                tokens[i] = token
        for i, seq in enumerate(seqs):
            grammar = seq.handle.grammar
            if grammar is None:
                continue
            remaining = seq.request.max_tokens - seq.generated
            try:
                tokens[i] = grammar.next_token(seq.sampler.next_token, logits[i], remaining)
            except Exception as err:  # a sequence whose grammar fails fails alone
                log.exception("sampling failed for %s", seq.request.request_id)
                self._fail(seq, err)
        return tokens

    def _advance(self, seq: _Sequence, token: int, now: float, logprob: TokenLogprob | None = None) -> None:
        seq.sampler.observe(token)
        seq.output_ids.append(token)
        if seq.generated == 1:
            seq.handle.first_token_at = now
            metrics.TIME_TO_FIRST_TOKEN.observe(now - seq.handle.queued_at)
            metrics.PROMPT_TOKENS.inc(len(seq.request.prompt_ids))
        else:
            metrics.INTER_TOKEN.observe(now - seq.last_token_at)
        seq.last_token_at = now
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
        step = Step(
            [token],
            text,
            finish,
            len(seq.request.prompt_ids),
            seq.generated,
            logprobs,
            prompt_logprobs,
            seq.cached_tokens,
        )
        seq.handle._put(step)
        if finish:
            self._release(seq, finish)


def _logprobs(logits: torch.Tensor, targets: list[int], tops: list[int]) -> list[TokenLogprob]:
    """The model's own log probability of targets[i] under row i (before sampling settings), with
    its tops[i] best alternatives: one log-softmax and one top-k for all rows."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(targets, device=logits.device).unsqueeze(1)
    chosen = logprobs.gather(1, index).squeeze(1).tolist()
    widest = max(tops, default=0)
    best = torch.topk(logprobs, widest) if widest else None
    best_ids = best.indices.tolist() if best is not None else [[] for _ in targets]
    best_values = best.values.tolist() if best is not None else [[] for _ in targets]
    return [
        TokenLogprob(target, value, tuple(zip(best_ids[row][:top], best_values[row][:top], strict=True)))
        for row, (target, value, top) in enumerate(zip(targets, chosen, tops, strict=True))
    ]
