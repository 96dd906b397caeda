from __future__ import annotations

import math
import random

import torch

from services.inference.engine_api import SamplingConfig
from services.inference.sampling import Sampler, apply_penalties, sample, shaped_logits

CPU = torch.device("cpu")
LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])


def _kept(config: SamplingConfig, logits: torch.Tensor = LOGITS) -> list[bool]:
    """Which tokens a row with this config may still sample."""
    return torch.isfinite(shaped_logits([Sampler(config, logits.numel(), CPU)], logits.unsqueeze(0))[0]).tolist()


def test_greedy_takes_the_argmax() -> None:
    assert Sampler(SamplingConfig(temperature=0), 5, CPU).next_token(LOGITS) == 1


def test_top_k_keeps_only_the_k_best() -> None:
    assert _kept(SamplingConfig(top_k=2)) == [False, True, True, False, False]


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    probs = torch.softmax(LOGITS, -1)  # ≈ [.08, .60, .22, .05, .01]
    assert _kept(SamplingConfig(top_p=0.7)) == [False, True, True, False, False]
    assert probs[1] < 0.7 <= probs[1] + probs[2]


def test_tiny_top_p_still_keeps_the_best_token() -> None:
    assert _kept(SamplingConfig(top_p=1e-6)) == [False, True, False, False, False]


def test_min_p_drops_tokens_below_its_share_of_the_best() -> None:
    probs = torch.softmax(LOGITS, -1)  # the best has .60: min_p 0.3 keeps .22 (≥ .18), drops .08
    assert _kept(SamplingConfig(min_p=0.3)) == [False, True, True, False, False]
    assert probs[2] >= 0.3 * probs[1] > probs[0]


def test_penalties_follow_the_openai_formula() -> None:
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0, 0.0]])
    out = apply_penalties(LOGITS.unsqueeze(0), counts, [SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25)])
    assert torch.allclose(out[0], torch.tensor([1.0, 3.0 - 0.5 - 0.5, 2.0 - 0.5 - 0.25, 0.5, -1.0]))


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    counts = torch.tensor([[0.0, 1.0, 0.0, 0.0, 3.0]])
    out = apply_penalties(LOGITS.unsqueeze(0), counts, [SamplingConfig(repetition_penalty=2.0)])
    assert out[0].tolist() == [1.0, 1.5, 2.0, 0.5, -2.0]


def test_penalty_changes_the_greedy_choice() -> None:
    sampler = Sampler(SamplingConfig(temperature=0, frequency_penalty=2.0), 5, CPU)
    sampler.observe(1)
    assert sampler.next_token(LOGITS) == 2


def test_same_seed_same_tokens_and_different_seed_differs() -> None:
    logits = torch.zeros(1000)

    def draw(seed: int) -> list[int]:
        sampler = Sampler(SamplingConfig(temperature=1.0, seed=seed), 1000, CPU)
        return [sampler.next_token(logits) for _ in range(20)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_sampling_respects_top_k() -> None:
    sampler = Sampler(SamplingConfig(temperature=5.0, top_k=2, seed=0), 5, CPU)
    assert {sampler.next_token(LOGITS) for _ in range(200)} == {1, 2}


def test_draws_follow_the_distribution() -> None:
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=11), 5, CPU)
    draws = [sampler.next_token(LOGITS) for _ in range(4000)]
    probs = torch.softmax(LOGITS, -1).tolist()
    for token, p in enumerate(probs):
        assert abs(draws.count(token) / len(draws) - p) < 4 * math.sqrt(p * (1 - p) / len(draws)) + 1e-3


def test_logit_bias_forces_or_bans_tokens_even_when_greedy() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0, 2.0])
    assert Sampler(SamplingConfig(temperature=0.0, logit_bias=((2, 100.0),)), 4, CPU).next_token(logits) == 2
    assert Sampler(SamplingConfig(temperature=0.0, logit_bias=((1, -100.0),)), 4, CPU).next_token(logits) == 3
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=3, logit_bias=((0, 100.0),)), 4, CPU)
    assert {sampler.next_token(logits) for _ in range(20)} == {0}


def _reference(config: SamplingConfig, logits: torch.Tensor, counts: torch.Tensor, uniform: float) -> int:
    """One row the plain way, token by token in Python: what the batched pass must equal."""
    values = [float(x) for x in logits]
    for token, bias in config.logit_bias:
        values[token] += bias
    for token, count in enumerate(counts.tolist()):
        if count:
            values[token] -= count * config.frequency_penalty + config.presence_penalty
            r = config.repetition_penalty
            values[token] = values[token] / r if values[token] > 0 else values[token] * r
    if config.greedy:
        return max(range(len(values)), key=lambda t: (values[t], -t))
    values = [v / config.temperature for v in values]
    ranked = sorted(range(len(values)), key=lambda t: -values[t])
    keep = set(ranked[: config.top_k] if config.top_k else ranked)
    top = max(values)
    weights = [math.exp(v - top) if t in keep else 0.0 for t, v in enumerate(values)]
    total = sum(weights)  # top-p reads the distribution that top-k left
    mass = 0.0
    for rank, token in enumerate(ranked):
        if mass >= config.top_p and rank > 0:
            keep.discard(token)
        mass += weights[token] / total
    best = max(weights[t] for t in keep) / total
    keep = {t for t in keep if weights[t] / total >= config.min_p * best}
    kept = [weights[t] if t in keep else 0.0 for t in range(len(values))]
    target, cumulative = uniform * sum(kept), 0.0
    for token, weight in enumerate(kept):
        cumulative += weight
        if weight and cumulative > target:
            return token
    return max(t for t in range(len(kept)) if kept[t])


def test_the_batched_pass_matches_the_per_row_reference_on_fixed_seeds() -> None:
    vocab = 50
    configs = [
        SamplingConfig(temperature=0.0),
        SamplingConfig(temperature=0.7, seed=1),
        SamplingConfig(temperature=1.3, top_k=5, seed=2),
        SamplingConfig(temperature=1.0, top_p=0.6, seed=3, frequency_penalty=0.5),
        SamplingConfig(temperature=0.9, min_p=0.2, seed=4, presence_penalty=0.7),
        SamplingConfig(temperature=0.0, repetition_penalty=1.5, logit_bias=((7, 3.0),)),
        SamplingConfig(temperature=1.1, top_k=10, top_p=0.8, min_p=0.05, seed=6, logit_bias=((3, -50.0),)),
    ]
    samplers = [Sampler(c, vocab, CPU) for c in configs]
    replay = [random.Random(c.seed) for c in configs]  # the same draws the samplers make
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        logits = torch.randn(len(configs), vocab, generator=generator) * 3
        counts = [s.counts.clone() if s.counts is not None else torch.zeros(vocab) for s in samplers]
        tokens = sample(samplers, logits)
        expected = [
            _reference(c, logits[i], counts[i], 0.0 if c.greedy else replay[i].random()) for i, c in enumerate(configs)
        ]
        assert tokens == expected
        for sampler, token in zip(samplers, tokens, strict=True):
            sampler.observe(token)


def test_a_row_samples_the_same_alone_and_in_a_batch() -> None:
    vocab = 300
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(8, vocab, generator=generator)
    configs = [SamplingConfig(temperature=0.5 + i / 8, top_p=0.9, top_k=i * 20, seed=i) for i in range(8)]
    batched = [Sampler(c, vocab, CPU) for c in configs]
    alone = [Sampler(c, vocab, CPU) for c in configs]
    for _ in range(20):
        together = sample(batched, logits)
        assert together == [sample([s], logits[i : i + 1])[0] for i, s in enumerate(alone)]
