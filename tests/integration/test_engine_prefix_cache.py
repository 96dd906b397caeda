"""Prefix caching in the engine, on the real default model: reuse never changes output, cached
tokens are exact, eviction only takes idle blocks, cancelled sequences let go of theirs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from meshproc import wait_for
from prometheus_client import REGISTRY

from services.inference.engine import Engine
from services.inference.engine_api import GenerationRequest, SamplingConfig, Step
from services.inference.loader import load_model
from services.inference.paged_attention import kv_geometry
from services.inference.scheduler import EngineLimits

GREEDY = SamplingConfig(temperature=0)
BLOCK = 16


@pytest.fixture
def make_engine(model_dir: Path) -> Callable[..., Engine]:
    return lambda **limits: Engine(load_model(model_dir, "cpu", dtype="float32"), EngineLimits(**limits))


def _tokens(engine: Engine, text: str) -> list[int]:
    return engine.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def _run(engine: Engine, prompt: list[int], max_tokens: int = 24, config: SamplingConfig = GREEDY) -> list[Step]:
    return list(engine.submit(GenerationRequest("p", prompt, max_tokens, config)))


def _ids(steps: list[Step]) -> list[int]:
    return [t for step in steps for t in step.token_ids]


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def _system(engine: Engine, length: int) -> list[int]:
    """A shared system prompt of exactly `length` tokens."""
    text = "system: you answer questions about lorem ipsum dolor sit amet, briefly. " * 40
    tokens = _tokens(engine, text)
    assert len(tokens) >= length
    return tokens[:length]


@pytest.mark.parametrize("shared", [5 * BLOCK, 5 * BLOCK + 7], ids=["block-aligned", "mid-block"])
def test_greedy_output_is_identical_with_and_without_reuse_and_cached_tokens_are_exact(
    make_engine: Callable[..., Engine], shared: int
) -> None:
    cached, plain = make_engine(), make_engine(prefix_caching=False)
    system = _system(cached, shared)
    questions = [_tokens(cached, f" question {i}: what does {'lorem ' * i}mean?") for i in range(4)]
    hits_before = _metric("sluice_inference_prefix_cache_hit_tokens_total")
    for i, question in enumerate(questions):
        prompt = system + question
        with_reuse, without = _run(cached, prompt), _run(plain, prompt)
        assert _ids(with_reuse) == _ids(without)
        # The first prompt computes everything; the others find the system prompt's full blocks
        # (a block that ends past the shared tokens differs, and the last token is always computed).
        expected = 0 if i == 0 else min(shared // BLOCK, (len(prompt) - 1) // BLOCK) * BLOCK
        assert with_reuse[-1].cached_tokens == expected
        assert without[-1].cached_tokens == 0
    assert _metric("sluice_inference_prefix_cache_hit_tokens_total") - hits_before == 3 * (shared // BLOCK) * BLOCK


def test_a_repeated_prompt_reuses_all_but_its_last_token_and_the_previous_answer(
    make_engine: Callable[..., Engine],
) -> None:
    engine, plain = make_engine(), make_engine(prefix_caching=False)
    prompt = _system(engine, 4 * BLOCK)  # ends on a block boundary: its last block is recomputed
    first = _run(engine, prompt, max_tokens=40)
    again = _run(engine, prompt, max_tokens=40)
    assert _ids(again) == _ids(first) == _ids(_run(plain, prompt, max_tokens=40))
    assert again[-1].cached_tokens == 3 * BLOCK
    # The next turn starts with this turn's prompt and answer: the answer's full blocks are cached too.
    turn = prompt + _ids(first) + _tokens(engine, " and then?")
    assert _run(engine, turn)[-1].cached_tokens == (len(prompt) + len(_ids(first))) // BLOCK * BLOCK


def test_eviction_under_block_pressure_never_takes_a_block_in_use(make_engine: Callable[..., Engine]) -> None:
    probe = make_engine(prefix_caching=False)
    geometry = kv_geometry(probe.loaded.model)
    blocks = 24
    engine = make_engine(kv_cache_bytes=geometry.bytes_per_token(probe.loaded.model.dtype) * BLOCK * blocks)
    system = _system(engine, 8 * BLOCK)
    prompts = [system + _tokens(engine, f" q{i}: {'ipsum ' * (i + 1)}?") for i in range(6)]
    # Fill the cache with other prompts' idle blocks first, so that the run below must evict.
    for i in range(3):
        _run(engine, _tokens(engine, f"filler {i} " + "dolor sit " * 60)[: 10 * BLOCK], max_tokens=4)
    evictions = _metric("sluice_inference_prefix_cache_evictions_total")
    handles = [engine.submit(GenerationRequest(f"e{i}", p, 32, GREEDY)) for i, p in enumerate(prompts)]
    outputs = [[t for step in handle for t in step.token_ids] for handle in handles]
    assert outputs == [_ids(_run(probe, p, 32)) for p in prompts]
    assert _metric("sluice_inference_prefix_cache_evictions_total") > evictions
    assert engine.kv_blocks_used == 0


def test_cancelled_sequences_release_their_shared_blocks(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(max_running=8)
    system = _system(engine, 6 * BLOCK)
    _run(engine, [*system, 7], max_tokens=2)  # the system prompt is cached now
    endless = SamplingConfig(temperature=0, ignore_eos=True)
    handles = [engine.submit(GenerationRequest(f"c{i}", [*system, 8 + i], 500, endless)) for i in range(12)]
    for i, handle in enumerate(handles):
        if i % 2 == 0:
            next(iter(handle))  # half mid-stream, the rest queued or prefilling
        handle.cancel()
    assert wait_for(lambda: engine.running == 0 and engine.kv_blocks_used == 0), "references stayed held"
    load = engine.load()
    assert load.kv_blocks_free == load.kv_blocks_total and load.prefix_cached_blocks >= 6
    # Still findable after all that: the next request reuses the system prompt.
    assert _run(engine, [*system, 9], max_tokens=2)[-1].cached_tokens == 6 * BLOCK


def test_prompt_logprobs_requests_compute_their_whole_prompt(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine()
    prompt = _system(engine, 3 * BLOCK + 2)
    _run(engine, prompt, max_tokens=2)
    handle = engine.submit(GenerationRequest("lp", prompt, 2, GREEDY, prompt_logprobs=0))
    steps = list(handle)
    assert steps[-1].cached_tokens == 0
    assert len(steps[0].prompt_logprobs) == len(prompt)
