"""Choosing the next token from logits: penalties, temperature, top-k, top-p, seeded RNG."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: can be decided for many sequences in one batched op."""
        return self.greedy and not self.penalized and not self.logit_bias


class Sampler:
    """Per-sequence sampler; owns the sequence's RNG so a seed reproduces the same tokens."""

    def __init__(self, config: SamplingConfig, vocab_size: int, device: torch.device) -> None:
        self.config = config
        self._generator: torch.Generator | None = None
        if not config.greedy:
            self._generator = torch.Generator(device=device)
            if config.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(config.seed)
        # Token counts cost an indexing op per token, so only penalised sequences keep them.
        self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device) if config.penalized else None
        self._bias: torch.Tensor | None = None
        if config.logit_bias:
            self._bias = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            ids, values = zip(*config.logit_bias, strict=True)
            self._bias[list(ids)] = torch.tensor(values, dtype=torch.float32, device=device)

    def observe(self, token_id: int) -> None:
        """Record a generated token for presence/frequency penalties."""
        if self._counts is not None and token_id < self._counts.numel():
            self._counts[token_id] += 1

    def next_token(self, logits: torch.Tensor) -> int:
        """Pick the next token from a 1-D logits vector."""
        logits = logits.float()
        if self._bias is not None:
            logits = logits + self._bias[: logits.numel()]
        if self._counts is not None:
            logits = apply_penalties(logits, self._counts, self.config)
        if self.config.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(filter_logits(logits / self.config.temperature, self.config), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """OpenAI's definition: logit -= count * frequency_penalty + (count > 0) * presence_penalty."""
    if not config.penalized:
        return logits
    counts = counts[: logits.numel()]
    return logits - counts * config.frequency_penalty - (counts > 0).float() * config.presence_penalty


def filter_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Mask everything outside top-k and the top-p nucleus with -inf (the best token always survives)."""
    if 0 < config.top_k < logits.numel():
        kth = torch.topk(logits, config.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
