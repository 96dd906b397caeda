"""What the inference service asks of an engine, whichever engine it is: a request in, a
generation out whose steps stream as tokens are produced, and the engine's load.

The built-in engine (engine.py: scheduler, model runner, output processing) implements it; so
can an engine that drives another server. No torch here: the contract is plain data.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already generated (CTRL's definition)
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


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


class Generation(Protocol):
    """A submitted request as its reader sees it. The time.monotonic() readings of its phases are
    for tracing (None: not reached)."""

    request: GenerationRequest
    queued_at: float
    admitted_at: float | None
    first_token_at: float | None
    finished_at: float | None

    def steps(self) -> AsyncIterator[Step]:
        """Steps until the finishing one (a cancelled generation ends without one); a failure is raised."""
        ...

    def cancel(self) -> None: ...


class GenerationEngine(Protocol):
    name: str  # which engine: builtin, vllm

    def submit(self, request: GenerationRequest, deadline: float | None = None) -> Generation:
        """Queue the request (it may block briefly: call it off the event loop); MeshErrors for a
        request it cannot serve. A queued request not admitted by `deadline` (time.monotonic())
        fails with DeadlineExceeded."""
        ...

    def load(self) -> EngineLoad: ...

    def stalled(self, after_s: float) -> bool:
        """Work is waiting or running, yet nothing progressed for `after_s` seconds."""
        ...

    def token_text(self, token_id: int) -> str:
        """One token's own text (for log probabilities)."""
        ...
