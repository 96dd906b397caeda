"""The built-in engine's scheduler: which sequences run, what each step computes, and the KV
blocks they hold. No torch: it hands the model runner a StepPlan of plain numbers.

Sequences join at any step boundary and leave the moment they finish or are cancelled, freeing
their blocks. A sequence holds blocks for what it has computed and takes another when it grows
into it; when none is free, the newest running sequence is preempted: its blocks go back, and it
later recomputes its prompt and output so far (the runner keeps its sampler state, so its tokens
are unchanged). Full blocks are indexed by the hash chain of their tokens (prefix_cache.py): a
prompt that starts like one computed before holds those blocks and prefills only the rest, and a
preempted sequence finds its own blocks again unless they were evicted meanwhile.

Every step packs one new token per decoding sequence plus prefill chunks of newcomers, within
`max_batched_tokens`; at most `max_running` sequences run and `max_waiting` requests queue
(beyond that, adding fails fast with RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.inference import metrics
from services.inference.kv_blocks import SequenceBlocks
from services.inference.prefix_cache import BlockCache
from services.inference.sequences import Sequence, SequenceHandle
from services.mesh.contracts.errors import DeadlineExceeded, MeshError, ResourceExhausted
from services.mesh.contracts.prefix_hash import BlockHash, block_hashes

# With batch_invariant on, decoding rows attend in groups of one padded length per this many
# positions, so a row's arithmetic never depends on what else is in the batch (the runner also
# never runs fewer than a few rows: model_runner.INVARIANT_ROWS).
INVARIANT_SPAN = 64


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
    prepack_weights: bool = True  # the model runner's: CPU linear layers on prepacked oneDNN weights
    torch_threads: int | None = None  # the model runner's: set (0: measured) or, None, left as torch has it


@dataclass(frozen=True)
class DecodeBatch:
    """Decoding rows start..start+len(sequences)-1, each attending over `length` padded positions."""

    start: int
    sequences: list[Sequence]
    length: int


@dataclass(frozen=True)
class PrefillChunk:
    """Rows start..start+count-1: positions past..past+count-1 of its sequence's prompt (and output,
    when it recomputes after a preemption)."""

    start: int
    count: int
    past: int
    sequence: Sequence


@dataclass
class StepPlan:
    """One forward pass: the packed tokens, where their keys and values go, which rows yield
    logits, and which sequences grow by how many positions."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    writes: list[int] = field(default_factory=list)  # pool slot of each packed token
    decode: list[DecodeBatch] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    grown: list[tuple[Sequence, int]] = field(default_factory=list)
    sampled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, row of its logits)
    scored: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (sequence, row, prompt index)
    fresh_blocks: list[int] = field(default_factory=list)  # handed out since the last step: zero them first


@dataclass(frozen=True)
class Dropped:
    """A queued request that leaves without running: cancelled (no error) or past its deadline."""

    handle: SequenceHandle
    error: MeshError | None


class Scheduler:
    def __init__(
        self, limits: EngineLimits, blocks: BlockCache, root: BlockHash, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """`blocks`: the KV block bookkeeping; `root`: the hash the model's cached blocks chain from."""
        self.limits = limits
        self.blocks = blocks
        self._root = root
        self._clock = clock
        # Admitting a prompt leaves this many blocks for running sequences to grow into.
        self._headroom = blocks.count // 100
        self._waiting: collections.deque[SequenceHandle] = collections.deque()
        self._wakeup = threading.Condition()  # guards _waiting: requests arrive from other threads
        self.running: list[Sequence] = []
        self._preempted: list[Sequence] = []  # oldest first; re-admitted before anything waiting
        self._admissions = itertools.count()
        self._fresh: list[int] = []
        self.last_progress = clock()
        self.publish()

    # ------------------------------------------------------------------ arrival

    def add(self, handle: SequenceHandle) -> None:
        """Queue a request (from any thread)."""
        with self._wakeup:
            if len(self._waiting) >= self.limits.max_waiting:
                metrics.REJECTED.inc()
                raise ResourceExhausted(f"the queue of {self.limits.max_waiting} waiting requests is full; retry later")
            if not self.busy:
                self.last_progress = self._clock()  # an idle engine is not a stalled one
            self._waiting.append(handle)
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            self._wakeup.notify()

    def wait_for_work(self) -> None:
        """Block until something is queued or running."""
        with self._wakeup:
            while not self.busy:
                self._wakeup.wait()

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self.running or self._preempted)

    def progressing(self) -> None:
        """The engine loop came round again (called at the top of each turn)."""
        self.last_progress = self._clock()

    def stalled(self, after_s: float) -> bool:
        """Work is waiting or running, yet the engine loop has not come round for `after_s` seconds:
        a hung engine behind a live process."""
        return self.busy and self._clock() - self.last_progress > after_s

    # ------------------------------------------------------------------ admission

    def cancelled(self) -> list[Sequence]:
        """Admitted sequences whose readers cancelled them (to release)."""
        return [s for s in self.running + self._preempted if s.handle.cancelled]

    def admit(self) -> tuple[list[Sequence], list[Dropped]]:
        """Move preempted sequences back, then waiting requests, into the batch while sequences and
        KV blocks allow, in arrival order (the head waits for memory: large requests never starve).
        Returns the newly admitted sequences and the queued requests dropped (cancelled, expired)."""
        now = self._clock()
        with self._wakeup:
            dropped = self._sweep_waiting(now)
            while self._preempted and len(self.running) < self.limits.max_running:
                if not self._reserve(self._preempted[0]):
                    break
                self.running.append(self._preempted.pop(0))
            admitted = []
            while not self._preempted and self._waiting and len(self.running) < self.limits.max_running:
                handle = self._waiting[0]
                request = handle.request
                seq = Sequence(
                    handle=handle,
                    kv=SequenceBlocks(self.limits.kv_block_size),
                    order=next(self._admissions),
                    target=len(request.prompt_ids),
                )
                if self.blocks.enabled:
                    if not handle.prompt_hashes:
                        handle.prompt_hashes = block_hashes(request.prompt_ids, self.limits.kv_block_size, self._root)
                    seq.hashes = handle.prompt_hashes  # never changed in place: _index builds a new list
                if not self._reserve(seq):
                    break
                seq.cached_tokens = seq.kv.length
                if self.blocks.enabled:
                    metrics.PREFIX_LOOKUPS.inc()
                    metrics.PREFIX_QUERY_TOKENS.inc(len(request.prompt_ids))
                    metrics.PREFIX_HIT_TOKENS.inc(seq.cached_tokens)
                self._waiting.popleft()
                self.running.append(seq)
                admitted.append(seq)
                handle.admitted_at = now
                metrics.SEQUENCES_STARTED.inc()
                metrics.QUEUE_WAIT.observe(now - handle.queued_at)
        self.publish()
        return admitted, dropped

    def _sweep_waiting(self, now: float) -> list[Dropped]:
        """Queued requests that were cancelled or whose deadline passed leave now, wherever they
        wait in the queue: their callers are answered at once, not when a slot frees up."""
        gone = [h for h in self._waiting if h.cancelled or (h.deadline is not None and now >= h.deadline)]
        dropped = []
        for handle in gone:
            self._waiting.remove(handle)
            if handle.cancelled:
                metrics.SEQUENCES_FINISHED.labels("cancelled").inc()
                dropped.append(Dropped(handle, None))
            else:
                metrics.SEQUENCES_FINISHED.labels("expired").inc()
                expired = DeadlineExceeded("the request's deadline passed while it waited in the queue")
                dropped.append(Dropped(handle, expired))
        return dropped

    def _reserve(self, seq: Sequence) -> bool:
        """Give the sequence blocks for everything it is about to prefill, if the pool allows: the
        cached blocks its tokens start with, and fresh ones for the rest."""
        size = self.limits.kv_block_size
        matched: list[int] = []
        if seq.request.prompt_logprobs is None:  # scoring the prompt needs every position's logits
            # The last token is always computed: its logits choose the next one.
            matched = self.blocks.match(seq.hashes[: (seq.target - 1) // size])
        missing = seq.kv.missing(seq.target) - len(matched)
        headroom = self._headroom if self.running else 0
        if missing + headroom > self.blocks.free - self.blocks.idle_among(matched):
            return False
        self.blocks.hold(matched)
        seq.kv.blocks = matched + self._take(missing)
        seq.kv.length = seq.prefilled = len(matched) * size
        seq.indexed = len(matched)
        return True

    def _take(self, count: int) -> list[int]:
        blocks = self.blocks.take(count)
        self._fresh += blocks
        return blocks

    def _preempt(self, seq: Sequence) -> None:
        """Take the sequence out of the batch and give its blocks back; it recomputes later."""
        self.running.remove(seq)
        self.blocks.release(seq.kv.blocks)
        seq.kv = SequenceBlocks(self.limits.kv_block_size)
        seq.prefilled, seq.indexed, seq.target = 0, 0, len(seq.request.prompt_ids) + seq.generated
        seq.prompt_logprobs.clear()  # a sequence preempted mid-prompt scores its prompt again
        self._preempted.append(seq)
        self._preempted.sort(key=lambda s: s.order)
        metrics.PREEMPTIONS.inc()

    def release(self, seq: Sequence, reason: str) -> None:
        """The sequence leaves (finished, cancelled or failed): its blocks go back."""
        seq.handle.finished_at = seq.handle.finished_at or self._clock()
        (self.running if seq in self.running else self._preempted).remove(seq)
        self.blocks.release(seq.kv.blocks)
        seq.kv.blocks = []
        metrics.SEQUENCES_FINISHED.labels(reason).inc()
        self.publish()

    def publish(self) -> None:
        metrics.QUEUE_DEPTH.set(len(self._waiting))
        metrics.RUNNING.set(len(self.running))
        metrics.KV_BLOCKS.labels("used").set(self.blocks.used)
        metrics.KV_BLOCKS.labels("free").set(self.blocks.free)
        metrics.PREFIX_CACHED_BLOCKS.set(self.blocks.cached)

    def waiting(self) -> int:
        """Queued requests, and preempted sequences waiting to resume."""
        return len(self._waiting) + len(self._preempted)

    # ------------------------------------------------------------------ the step

    def schedule(self) -> StepPlan | None:
        """This step's plan (None: nothing runs): room to grow for every decoding sequence (which may
        preempt), then one token per decoding sequence and prefill chunks within the token budget."""
        self._grow()
        if not self.running:
            return None
        plan = self._plan()
        plan.fresh_blocks, self._fresh = self._fresh, []
        return plan

    def _grow(self) -> None:
        """Give every decoding sequence room for this step's token, oldest first; when blocks run
        out, preempt the newest sequence (possibly the one growing)."""
        for seq in sorted(self.running, key=lambda s: s.order):
            if seq.prefilling or seq not in self.running:
                continue
            missing = seq.kv.missing(seq.kv.length + 1)
            if not missing:  # most steps: the token fits in the last block
                continue
            while missing > self.blocks.free:
                newest = max(self.running, key=lambda s: s.order)
                self._preempt(newest)
                if newest is seq:
                    break
            else:
                seq.kv.blocks += self._take(missing)

    def _plan(self) -> StepPlan:
        """Pack this step's tokens; also where logits are wanted: the row each sampling sequence
        samples from, and for sequences that asked for their prompt's log probabilities, (row,
        prompt index it predicts)."""
        plan = StepPlan()
        decoding = [s for s in self.running if not s.prefilling]
        spans: dict[int, list[Sequence]] = {}
        for seq in decoding:
            spans.setdefault(self._span(seq.kv.length + 1), []).append(seq)
        for span, group in sorted(spans.items()):
            length = span or max(s.kv.length + 1 for s in group)
            plan.decode.append(DecodeBatch(len(plan.ids), group, length))
            for seq in group:
                plan.sampled.append((seq, len(plan.ids)))
                plan.ids.append(seq.output_ids[-1])
                plan.positions.append(seq.kv.length)
                plan.writes += seq.kv.slots(seq.kv.length, seq.kv.length + 1)
                plan.grown.append((seq, 1))
        budget = self.limits.max_batched_tokens - len(plan.ids)
        for seq in self.running:
            if not seq.prefilling:
                continue
            # A fixed chunk size keeps prefill identical whatever else is running.
            chunk = seq.context(seq.prefilled, min(seq.target, seq.prefilled + self.limits.prefill_chunk))
            if len(chunk) > budget:
                break
            past, start = seq.kv.length, len(plan.ids)
            plan.prefill.append(PrefillChunk(start, len(chunk), past, seq))
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

    def _span(self, length: int) -> int:
        """The padded attention length of a decoding row in batch-invariant mode (0: one group)."""
        return math.ceil(length / INVARIANT_SPAN) * INVARIANT_SPAN if self.limits.batch_invariant else 0

    def computed(self, plan: StepPlan) -> None:
        """The forward pass of `plan` ran: the sequences' new positions hold keys and values, and
        their newly filled blocks become findable by their tokens (output included: the next turn
        of a conversation starts with this one's answer)."""
        for seq, count in plan.grown:
            seq.kv.length += count
            self._index(seq)

    def _index(self, seq: Sequence) -> None:
        size = self.limits.kv_block_size
        full = seq.kv.length // size
        if not self.blocks.enabled or full <= seq.indexed:
            return
        if len(seq.hashes) < full:
            seq.hashes = block_hashes(seq.context(0, full * size), size, self._root, seq.hashes)
        for index in range(seq.indexed, full):
            self.blocks.register(seq.kv.blocks[index], seq.hashes[index])
        seq.indexed = full
