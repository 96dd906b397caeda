"""The engine on the real default model, in-process: streaming, stopping, cancelling, validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY

from services.inference.engine import Engine
from services.inference.engine_api import GenerationRequest, SamplingConfig
from services.inference.loader import load_model
from services.inference.threads import apply_threads
from services.mesh.contracts.errors import ContextLengthExceeded, InvalidArgument

GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    return Engine(load_model(model_dir, "cpu", dtype="float32"))


def _prompt(engine: Engine) -> list[int]:
    return engine.loaded.tokenizer("import os\nimport sys\n", add_special_tokens=False)["input_ids"]


def test_greedy_stream_reproduces_the_full_decode(engine: Engine) -> None:
    steps = list(engine.submit(GenerationRequest("a", _prompt(engine), 100, GREEDY)))
    ids = [t for s in steps for t in s.token_ids]
    assert len(ids) == 100
    assert "".join(s.text for s in steps) == engine.loaded.tokenizer.decode(ids, skip_special_tokens=True)
    assert [s.finish_reason for s in steps[:-1]] == [None] * (len(steps) - 1)
    assert steps[-1].finish_reason == "length"
    assert (steps[-1].prompt_tokens, steps[-1].completion_tokens) == (len(_prompt(engine)), 100)


def test_engine_output_matches_transformers_generate(engine: Engine, model_dir: Path) -> None:
    prompt = _prompt(engine)
    ours = [t for s in engine.submit(GenerationRequest("b", prompt, 30, GREEDY)) for t in s.token_ids]
    # A model of its own: the engine routes its model's attention through paged attention.
    plain = load_model(model_dir, "cpu", dtype="float32").model
    with torch.inference_mode():
        reference = plain.generate(
            torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert ours == reference


def test_stop_string_finishes_with_stop(engine: Engine) -> None:
    free = "".join(s.text for s in engine.submit(GenerationRequest("c", _prompt(engine), 60, GREEDY)))
    stop = free[15:18]
    steps = list(engine.submit(GenerationRequest("d", _prompt(engine), 60, GREEDY, stop=(stop,))))
    assert "".join(s.text for s in steps) == free[: free.index(stop)]
    assert steps[-1].finish_reason == "stop"
    assert steps[-1].completion_tokens < 60


def test_cancelled_sequence_leaves_and_the_next_one_runs(engine: Engine) -> None:
    cancelled = _cancelled()
    handle = engine.submit(GenerationRequest("e", _prompt(engine), 1000, GREEDY))
    received = []
    for step in handle:
        received.append(step)
        if len(received) == 2:
            handle.cancel()
    assert 2 <= len(received) < 1000
    assert received[-1].finish_reason is None
    follow_up = list(engine.submit(GenerationRequest("f", _prompt(engine), 3, GREEDY)))
    assert follow_up[-1].finish_reason == "length"
    assert _cancelled() == cancelled + 1


def _cancelled() -> float:
    """Sequences cancelled so far (the labelled sample exists only once one has been)."""
    return REGISTRY.get_sample_value("sluice_inference_sequences_finished_total", {"reason": "cancelled"}) or 0.0


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "error"),
    [
        ([], 5, InvalidArgument),
        ([1, 99999], 5, InvalidArgument),
        ([1, 2], 0, InvalidArgument),
        ([1] * 2000, 100, ContextLengthExceeded),
    ],
)
def test_invalid_requests_are_refused_before_queueing(
    engine: Engine, prompt: list[int], max_tokens: int, error: type
) -> None:
    with pytest.raises(error):
        engine.submit(GenerationRequest("g", prompt, max_tokens, GREEDY))


def test_torch_threads_setting_sets_the_intra_op_threads(engine: Engine) -> None:
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    try:
        assert apply_threads(engine.loaded.model, wanted).threads == wanted
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


def test_auto_threads_measure_the_model_and_pick_one_or_all(engine: Engine) -> None:
    before = torch.get_num_threads()
    try:
        chosen = apply_threads(engine.loaded.model, 0).threads
        assert chosen in {1, before}
        assert torch.get_num_threads() == chosen
    finally:
        torch.set_num_threads(before)


def test_structured_output_ends_with_its_json_even_with_ignore_eos(engine: Engine) -> None:
    schema = '{"type":"object","properties":{"n":{"type":"integer"}},"required":["n"]}'
    sampling = SamplingConfig(temperature=1.0, seed=5, ignore_eos=True)
    steps = list(engine.submit(GenerationRequest("j", _prompt(engine), 64, sampling, json_schema=schema)))
    assert steps[-1].finish_reason == "stop"
    assert isinstance(json.loads("".join(s.text for s in steps))["n"], int)
    # The same sampling without a schema runs to max_tokens (ignore_eos), so the JSON's end stopped it.
    free = list(engine.submit(GenerationRequest("f", _prompt(engine), 64, sampling)))
    assert free[-1].finish_reason == "length" and free[-1].completion_tokens == 64


def test_structured_output_needs_room_for_its_shortest_json(engine: Engine) -> None:
    schema = '{"type":"object","properties":{"name":{"type":"string"}},"required":["name"]}'
    with pytest.raises(InvalidArgument, match="too small for this response_format") as err:
        engine.submit(GenerationRequest("s", _prompt(engine), 3, GREEDY, json_schema=schema))
    assert err.value.param == "max_tokens"


def test_prompt_logprobs_are_the_models_own_over_several_prefill_chunks(engine: Engine, model_dir: Path) -> None:
    """Echo with logprobs: every prompt token's log probability, as a plain forward pass of the
    model gives it, although the prompt is prefilled in chunks beside another sequence."""
    prompt = (_prompt(engine) * 60)[:600]  # more than two prefill chunks of 256
    reference = load_model(model_dir, "cpu", dtype="float32")
    with torch.inference_mode():
        logits = reference.model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    expected = [float(logits[i - 1, prompt[i]]) for i in range(1, len(prompt))]
    scored = engine.submit(GenerationRequest("p", prompt, 2, GREEDY, prompt_logprobs=2))
    beside = engine.submit(GenerationRequest("q", prompt[:50], 2, GREEDY))
    first = next(iter(scored))
    list(beside)
    entries = first.prompt_logprobs
    assert [e.token_id for e in entries] == prompt
    assert entries[0].logprob == 0 and not entries[0].top  # nothing predicts the first token
    assert max(abs(e.logprob - x) for e, x in zip(entries[1:], expected, strict=True)) < 1e-4
    assert all(len(e.top) == 2 and e.top[0][1] >= e.logprob for e in entries[1:])


def test_in_bfloat16_the_engine_scores_as_the_bfloat16_model_does(model_dir: Path) -> None:
    """bf16 (dtype auto on CPUs with bf16 instructions): prefill scores the prompt exactly as the
    model's own bf16 forward pass does, and greedy decoding agrees with the bf16 model's generate
    for its first tokens; later tokens may part ways at near-ties, as bf16 rounds attention
    differently (float32's equality is the test above)."""
    engine = Engine(load_model(model_dir, "cpu", dtype="bfloat16"))
    assert engine.loaded.model.dtype == torch.bfloat16
    prompt = (_prompt(engine) * 30)[:300]
    plain = load_model(model_dir, "cpu", dtype="bfloat16").model
    with torch.inference_mode():
        logits = plain(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        reference = plain.generate(
            torch.tensor([prompt[:20]]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, 20:].tolist()
    scored = next(iter(engine.submit(GenerationRequest("bf", prompt, 2, GREEDY, prompt_logprobs=0))))
    drift = max(abs(e.logprob - float(logits[i - 1, prompt[i]])) for i, e in enumerate(scored.prompt_logprobs) if i)
    assert drift < 0.02
    ours = [t for s in engine.submit(GenerationRequest("bg", prompt[:20], 8, GREEDY)) for t in s.token_ids]
    assert ours == reference
