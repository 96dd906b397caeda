"""A sequence in the built-in engine: the handle its reader holds (steps delivered from the engine
thread, cancellation), and the state the scheduler keeps of it (blocks, progress, output ids).

No torch here: what the model runner and output processing keep per sequence they keep
themselves, keyed by the sequence.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.inference.engine_api import GenerationRequest, Step, TokenLogprob
from services.inference.kv_blocks import SequenceBlocks
from services.inference.loop_waker import LoopWaker
from services.mesh.contracts.prefix_hash import BlockHash

if TYPE_CHECKING:
    from services.inference.structured import JsonMatcher


@dataclass(eq=False)
class SequenceHandle:
    """A Generation of the built-in engine."""

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

    def put(self, item: Step | BaseException | None) -> None:
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
class Sequence:
    """What the scheduler knows of an admitted sequence."""

    handle: SequenceHandle
    kv: SequenceBlocks
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
