from __future__ import annotations

import torch

from services.inference.sampling import Sampler, SamplingConfig, apply_penalties, filter_logits

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])


def test_greedy_takes_the_argmax() -> None:
    assert Sampler(SamplingConfig(temperature=0), 5, torch.device("cpu")).next_token(LOGITS) == 1


def test_top_k_keeps_only_the_k_best() -> None:
    kept = filter_logits(LOGITS, SamplingConfig(top_k=2))
    assert torch.isfinite(kept).tolist() == [False, True, True, False, False]


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    probs = torch.softmax(LOGITS, -1)  # ≈ [.08, .60, .22, .05, .01]
    kept = filter_logits(LOGITS, SamplingConfig(top_p=0.7))
    assert torch.isfinite(kept).tolist() == [False, True, True, False, False]
    assert probs[1] < 0.7 <= probs[1] + probs[2]


def test_tiny_top_p_still_keeps_the_best_token() -> None:
    assert torch.isfinite(filter_logits(LOGITS, SamplingConfig(top_p=1e-6))).tolist() == [
        False,
        True,
        False,
        False,
        False,
    ]


def test_penalties_follow_the_openai_formula() -> None:
    counts = torch.tensor([0.0, 2.0, 1.0, 0.0, 0.0])
    out = apply_penalties(LOGITS, counts, SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25))
    assert torch.allclose(out, torch.tensor([1.0, 3.0 - 0.5 - 0.5, 2.0 - 0.5 - 0.25, 0.5, -1.0]))


def test_penalty_changes_the_greedy_choice() -> None:
    sampler = Sampler(SamplingConfig(temperature=0, frequency_penalty=2.0), 5, torch.device("cpu"))
    sampler.observe(1)
    assert sampler.next_token(LOGITS) == 2


def test_same_seed_same_tokens_and_different_seed_differs() -> None:
    logits = torch.zeros(1000)

    def draw(seed: int) -> list[int]:
        sampler = Sampler(SamplingConfig(temperature=1.0, seed=seed), 1000, torch.device("cpu"))
        return [sampler.next_token(logits) for _ in range(20)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_sampling_respects_top_k() -> None:
    sampler = Sampler(SamplingConfig(temperature=5.0, top_k=2, seed=0), 5, torch.device("cpu"))
    assert {sampler.next_token(LOGITS) for _ in range(200)} == {1, 2}


def test_logit_bias_forces_or_bans_tokens_even_when_greedy() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0, 2.0])
    config = SamplingConfig(temperature=0.0, logit_bias=((2, 100.0),))
    assert not config.plain_greedy  # the batched argmax would not see the bias
    assert Sampler(config, 4, torch.device("cpu")).next_token(logits) == 2
    banned = SamplingConfig(temperature=0.0, logit_bias=((1, -100.0),))
    assert Sampler(banned, 4, torch.device("cpu")).next_token(logits) == 3
    sampled = SamplingConfig(temperature=1.0, seed=3, logit_bias=((0, 100.0),))
    sampler = Sampler(sampled, 4, torch.device("cpu"))
    assert {sampler.next_token(logits) for _ in range(20)} == {0}
