"""Choosing the next token for every sampling row of a step at once: logit bias, penalties,
temperature, top-k, top-p, min-p, then a seeded draw per row.

Every operation is a batched tensor op over the rows that need it; only the draw's uniform
number comes from each sequence's own generator, so a seed reproduces the same tokens whatever
else shares the batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from services.inference.engine_api import SamplingConfig


class Sampler:
    """One sequence's sampling state: its settings, its generator and the tokens it produced."""

    def __init__(self, config: SamplingConfig, vocab_size: int, device: torch.device) -> None:
        self.config = config
        # A Python generator: the draw needs one number per row and step, which costs no tensor op.
        self.rng = random.Random(config.seed) if config.seed is not None else random.Random()
        # Token counts cost an indexing op per token, so only penalised sequences keep them.
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device) if config.penalized else None
        self.bias_ids: torch.Tensor | None = None
        self.bias_values: torch.Tensor | None = None
        if config.logit_bias:
            ids, values = zip(*config.logit_bias, strict=True)
            self.bias_ids = torch.tensor(ids, device=device)
            self.bias_values = torch.tensor(values, dtype=torch.float32, device=device)

    def observe(self, token_id: int) -> None:
        """Record a generated token for the penalties."""
        if self.counts is not None and token_id < self.counts.numel():
            self.counts[token_id] += 1

    def next_token(self, logits: torch.Tensor) -> int:
        """Pick the next token from a 1-D logits vector (a row that samples on its own)."""
        return sample([self], logits.unsqueeze(0))[0]


def sample(samplers: Sequence[Sampler], logits: torch.Tensor) -> list[int]:
    """The next token of each row of `logits` ([rows, vocab]), row i sampled by samplers[i]."""
    shaped = shaped_logits(samplers, logits)
    tokens = shaped.argmax(dim=-1)  # greedy rows' answer; drawn rows replace theirs below
    drawn = [i for i, s in enumerate(samplers) if not s.config.greedy]
    if drawn:
        rows = torch.tensor(drawn, dtype=torch.long, device=logits.device)
        uniforms = torch.tensor([samplers[i].rng.random() for i in drawn], device=logits.device)
        tokens[rows] = _draw(torch.softmax(shaped[rows], dim=-1), uniforms)
    return tokens.tolist()


def shaped_logits(samplers: Sequence[Sampler], logits: torch.Tensor) -> torch.Tensor:
    """The logits each row samples from: bias and penalties applied, then for sampled rows the
    temperature, with everything outside top-k, the top-p nucleus and min-p set to -inf (the
    best token always survives). Greedy rows take the argmax of theirs. A batch with nothing to
    shape gets `logits` itself back: callers read the result, never write it."""
    configs = [s.config for s in samplers]
    device = logits.device
    biased = [i for i, s in enumerate(samplers) if s.bias_ids is not None]
    penalized = [i for i, s in enumerate(samplers) if s.counts is not None]
    if not biased and not penalized and all(c.greedy for c in configs):
        return logits.float()  # a plain greedy batch: nothing to shape, nothing to copy
    shaped = logits.float().clone()
    if biased:
        rows = torch.cat([torch.full_like(samplers[i].bias_ids, i) for i in biased])
        ids = torch.cat([samplers[i].bias_ids for i in biased])
        shaped.index_put_((rows, ids), torch.cat([samplers[i].bias_values for i in biased]), accumulate=True)
    if penalized:
        shaped[penalized] = apply_penalties(
            shaped[penalized],
            torch.stack([samplers[i].counts for i in penalized])[:, : shaped.shape[1]],
            [configs[i] for i in penalized],
        )
    drawn = _rows(samplers, lambda c: not c.greedy, device)
    if not drawn.numel():
        return shaped
    temperature = torch.tensor([configs[i].temperature for i in drawn.tolist()], device=device)
    shaped[drawn] = shaped[drawn] / temperature.unsqueeze(1)
    vocab = shaped.shape[1]
    top_k = _rows(samplers, lambda c: not c.greedy and 0 < c.top_k < vocab, device)
    if top_k.numel():
        ks = torch.tensor([configs[i].top_k for i in top_k.tolist()], device=device)
        best = torch.topk(shaped[top_k], int(ks.max())).values
        kth = best.gather(1, (ks - 1).unsqueeze(1))
        shaped[top_k] = shaped[top_k].masked_fill(shaped[top_k] < kth, float("-inf"))
    top_p = _rows(samplers, lambda c: not c.greedy and 0.0 < c.top_p < 1.0, device)
    if top_p.numel():
        ps = torch.tensor([configs[i].top_p for i in top_p.tolist()], device=device)
        ordered, order = torch.sort(shaped[top_p], dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_ordered = (probs.cumsum(dim=-1) - probs) >= ps.unsqueeze(1)
        drop = torch.zeros_like(drop_ordered).scatter(1, order, drop_ordered)
        shaped[top_p] = shaped[top_p].masked_fill(drop, float("-inf"))
    min_p = _rows(samplers, lambda c: not c.greedy and c.min_p > 0.0, device)
    if min_p.numel():
        ms = torch.tensor([configs[i].min_p for i in min_p.tolist()], device=device)
        probs = torch.softmax(shaped[min_p], dim=-1)
        floor = probs.max(dim=-1, keepdim=True).values * ms.unsqueeze(1)
        shaped[min_p] = shaped[min_p].masked_fill(probs < floor, float("-inf"))
    return shaped


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, configs: Sequence[SamplingConfig]) -> torch.Tensor:
    """Rows of logits penalised by their own token counts. OpenAI's presence and frequency
    penalties: logit -= count * frequency + (count > 0) * presence; then the repetition penalty:
    a seen token's logit is divided by it when positive, multiplied when negative."""
    device = logits.device
    frequency = torch.tensor([c.frequency_penalty for c in configs], device=device).unsqueeze(1)
    presence = torch.tensor([c.presence_penalty for c in configs], device=device).unsqueeze(1)
    repetition = torch.tensor([c.repetition_penalty for c in configs], device=device).unsqueeze(1)
    seen = counts > 0
    logits = logits - counts * frequency - seen.float() * presence
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    return torch.where(seen, repeated, logits)


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row i takes the first token whose cumulative probability passes
    uniforms[i] of its total (never a token of probability zero)."""
    cumulative = probs.cumsum(dim=-1)
    targets = (uniforms * cumulative[:, -1]).unsqueeze(1)
    picked = torch.searchsorted(cumulative, targets, right=True).squeeze(1)
    last_possible = (probs > 0).cumsum(dim=-1).argmax(dim=-1)  # rounding may carry past the end
    return torch.minimum(picked, last_possible)


def _rows(samplers: Sequence[Sampler], wanted: Callable[[SamplingConfig], bool], device: torch.device) -> torch.Tensor:
    return torch.tensor([i for i, s in enumerate(samplers) if wanted(s.config)], dtype=torch.long, device=device)
