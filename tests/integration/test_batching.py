"""Continuous batching on the real default model: invariance, per-request sampling, paged KV and
preemption, limits, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from meshproc import wait_for
from prometheus_client import REGISTRY

from services.inference import metrics
from services.inference.engine import Engine
from services.inference.engine_api import GenerationRequest, SamplingConfig
from services.inference.loader import load_model
from services.inference.paged_attention import kv_geometry
from services.inference.scheduler import EngineLimits
from services.inference.sequences import SequenceHandle
from services.mesh.contracts.errors import DeadlineExceeded, ResourceExhausted

GREEDY = SamplingConfig(temperature=0)
ENDLESS = SamplingConfig(temperature=0, ignore_eos=True)  # runs until cancelled or max_tokens


@pytest.fixture
def make_engine(model_dir: Path) -> Callable[..., Engine]:
    # Each engine owns its model: the attention routing is per model object.
    return lambda **limits: Engine(load_model(model_dir, "cpu", dtype="float32"), EngineLimits(**limits))


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    # Bitwise batch invariance on: a sequence's tokens may not depend on what shares its batch.
    return Engine(load_model(model_dir, "cpu", dtype="float32"), EngineLimits(batch_invariant=True))


def _prompts(engine: Engine, n: int) -> list[list[int]]:
    tok = engine.loaded.tokenizer
    return [tok(f"request {i}: " + "lorem ipsum " * (i * 5), add_special_tokens=False)["input_ids"] for i in range(n)]


def _ids(handle: SequenceHandle) -> list[int]:
    return [t for step in handle for t in step.token_ids]


def test_greedy_output_is_identical_alone_and_in_a_batch_of_16(engine: Engine) -> None:
    prompts = _prompts(engine, 16)
    alone = [_ids(engine.submit(GenerationRequest(f"a{i}", p, 48, GREEDY))) for i, p in enumerate(prompts)]
    steps_before, sequences_before = _batch_totals()
    handles = [engine.submit(GenerationRequest(f"b{i}", p, 48, GREEDY)) for i, p in enumerate(prompts)]
    batched = [_ids(h) for h in handles]
    assert batched == alone
    steps, sequences = (a - b for a, b in zip(_batch_totals(), (steps_before, sequences_before), strict=True))
    assert sequences / steps > 4, "the 16 requests were not batched together"


def _batch_totals() -> tuple[float, float]:
    """(forward passes, sequences advanced) so far, from the engine's batch-size histogram."""
    samples = {s.name: s.value for s in metrics.BATCH_SEQUENCES.collect()[0].samples}
    return samples["sluice_inference_batch_sequences_count"], samples["sluice_inference_batch_sequences_sum"]


def test_requests_with_different_sampling_in_one_batch_reproduce_their_solo_output(engine: Engine) -> None:
    prompt = _prompts(engine, 1)[0]
    configs = [
        SamplingConfig(temperature=0.7, seed=1),
        SamplingConfig(temperature=1.3, top_k=50, seed=2),
        SamplingConfig(temperature=1.0, top_p=0.8, seed=3, frequency_penalty=0.5),
        GREEDY,
    ]
    alone = [_ids(engine.submit(GenerationRequest("s", prompt, 32, c))) for c in configs]
    handles = [engine.submit(GenerationRequest("t", prompt, 32, c)) for c in configs]
    assert [_ids(h) for h in handles] == alone
    assert len({tuple(ids) for ids in alone}) == len(configs)


def test_long_prompt_is_prefilled_in_chunks_without_changing_the_output(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(max_batched_tokens=64, prefill_chunk=32, max_running=8)
    long_prompt = _prompts(engine, 40)[-1][:600]
    running = engine.submit(GenerationRequest("r", _prompts(engine, 1)[0], 200, ENDLESS))
    first = next(iter(running))
    assert first.token_ids
    ids = _ids(engine.submit(GenerationRequest("p", long_prompt, 8, GREEDY)))
    running.cancel()
    reference = make_engine()
    assert ids == _ids(reference.submit(GenerationRequest("q", long_prompt, 8, GREEDY)))


def test_cancelled_sequence_frees_its_slot(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(max_running=2)
    handles = [engine.submit(GenerationRequest(f"c{i}", [5, 6, 7], 1000, ENDLESS)) for i in range(2)]
    assert all(next(iter(h)).token_ids for h in handles)
    assert engine.kv_blocks_used > 0
    for h in handles:
        h.cancel()
    assert wait_for(lambda: engine.running == 0), "cancelled sequences stayed in the batch"
    assert engine.kv_blocks_used == 0
    assert REGISTRY.get_sample_value("sluice_inference_running_sequences") == 0


def test_full_queue_fails_fast(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(max_running=1, max_waiting=1)
    running = engine.submit(GenerationRequest("r", [5, 6, 7], 1000, ENDLESS))
    next(iter(running))
    waiting = engine.submit(GenerationRequest("w", [5, 6, 7], 5, GREEDY))
    with pytest.raises(ResourceExhausted, match="queue"):
        engine.submit(GenerationRequest("x", [5, 6, 7], 5, GREEDY))
    running.cancel()
    assert len(_ids(waiting)) == 5


def test_deadline_expired_while_queued_never_reaches_the_model(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(max_running=1)
    running = engine.submit(GenerationRequest("r", [5, 6, 7], 1000, ENDLESS))
    next(iter(running))
    started = REGISTRY.get_sample_value("sluice_inference_sequences_started_total")
    expiring = engine.submit(GenerationRequest("e", [5, 6, 7], 5, GREEDY), deadline=time.monotonic() + 0.05)
    with pytest.raises(DeadlineExceeded):
        _ids(expiring)
    assert REGISTRY.get_sample_value("sluice_inference_sequences_started_total") == started
    # Answered while the batch was still full, not once a slot freed up.
    assert engine.running == 1 and not running.cancelled
    running.cancel()


def test_a_cancelled_queued_request_leaves_while_the_batch_stays_full(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(max_running=1)
    running = engine.submit(GenerationRequest("r", [5, 6, 7], 1000, ENDLESS))
    next(iter(running))
    queued = [engine.submit(GenerationRequest(f"q{i}", [5, 6, 7], 5, GREEDY)) for i in range(3)]
    queued[1].cancel()  # the middle one: not at the head of the queue
    assert list(queued[1]) == []  # its stream ends with no step
    assert engine.running == 1 and engine.load().waiting == 2
    running.cancel()
    assert all(len(_ids(handle)) == 5 for handle in (queued[0], queued[2]))


def _block_budget(engine: Engine, blocks: int, block_size: int = 16) -> int:
    """kv_cache_bytes that hold exactly `blocks` blocks of this model's KV."""
    model = engine.loaded.model
    return kv_geometry(model).bytes_per_token(model.dtype) * block_size * blocks


class _Peak:
    """Samples an engine figure every millisecond while the block runs."""

    def __init__(self, read: Callable[[], int]) -> None:
        self.values: list[int] = []
        self._read, self._stop = read, threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.values.append(self._read())
            time.sleep(0.001)

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def test_kv_budget_bounds_the_blocks_in_use(make_engine: Callable[..., Engine]) -> None:
    probe = make_engine()
    engine = make_engine(kv_cache_bytes=_block_budget(probe, 6), max_batched_tokens=64, prefill_chunk=32)
    assert engine.kv_blocks_total == 6
    with pytest.raises(ResourceExhausted, match="budget"):
        engine.submit(GenerationRequest("big", [5] * 50, 50, GREEDY))  # 100 tokens > 96 slots
    with _Peak(lambda: engine.kv_blocks_used) as used:
        handles = [engine.submit(GenerationRequest(f"k{i}", [5, 6, 7], 57, ENDLESS)) for i in range(3)]
        results = [_ids(h) for h in handles]
    assert [len(r) for r in results] == [57, 57, 57]
    assert max(used.values) <= 6
    assert engine.kv_blocks_used == 0


def test_a_huge_request_does_not_block_small_ones(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine()
    context = engine.loaded.context_length
    huge = engine.submit(GenerationRequest("huge", [5, 6, 7], context - 3, ENDLESS))  # max_tokens at the context
    next(iter(huge))
    small = [engine.submit(GenerationRequest(f"s{i}", [5, 6, 7, i + 8], 8, GREEDY)) for i in range(4)]
    assert [len(_ids(h)) for h in small] == [8, 8, 8, 8]
    assert huge.finished_at is None, "the small requests waited for the huge one"
    huge.cancel()


@pytest.mark.parametrize(
    ("config", "count", "tokens", "blocks"),
    [
        # Room for about two of the six at full length (up to 194 tokens each): they take turns.
        pytest.param(GREEDY, 6, 40, 24, id="greedy"),
        # Seeded draws and penalties: the sampler's state must survive the recompute.
        pytest.param(
            SamplingConfig(temperature=0.9, top_p=0.95, seed=7, frequency_penalty=0.3, ignore_eos=True),
            4,
            48,
            9,
            id="seeded",
        ),
    ],
)
def test_preemption_under_block_pressure_completes_every_request_with_its_tokens(
    make_engine: Callable[..., Engine], config: SamplingConfig, count: int, tokens: int, blocks: int
) -> None:
    probe = make_engine(batch_invariant=True)
    prompts = _prompts(probe, count)
    reference = [_ids(probe.submit(GenerationRequest(f"r{i}", p, tokens, config))) for i, p in enumerate(prompts)]
    engine = make_engine(kv_cache_bytes=_block_budget(probe, blocks), batch_invariant=True)
    before = REGISTRY.get_sample_value("sluice_inference_preemptions_total") or 0.0
    handles = [engine.submit(GenerationRequest(f"p{i}", p, tokens, config)) for i, p in enumerate(prompts)]
    assert [_ids(h) for h in handles] == reference
    assert (REGISTRY.get_sample_value("sluice_inference_preemptions_total") or 0.0) > before
    assert engine.kv_blocks_used == 0


def test_kv_blocks_return_to_free_after_100_cancelled_streams(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(max_running=16)
    prompts = _prompts(engine, 10)
    handles = [engine.submit(GenerationRequest(f"c{i}", prompts[i % 10], 1000, ENDLESS)) for i in range(100)]
    for i, handle in enumerate(handles):
        if i % 3 == 0:
            next(iter(handle))  # some are cancelled mid-stream, the rest while queued or prefilling
        handle.cancel()
    assert wait_for(lambda: engine.running == 0 and engine.kv_blocks_used == 0), "blocks stayed taken"
    assert REGISTRY.get_sample_value("sluice_inference_kv_blocks", {"state": "free"}) == engine.kv_blocks_total


def test_tokens_that_pile_up_behind_a_slow_reader_arrive_as_one_step(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine()
    before = _finished("length")
    handle = engine.submit(GenerationRequest("slow", [5, 6, 7], 40, ENDLESS))
    assert wait_for(lambda: _finished("length") == before + 1), "the sequence did not finish"
    steps = list(handle)  # the reader only now looks: everything generated meanwhile is merged
    assert len(steps) == 1
    assert len(steps[0].token_ids) == 40
    assert steps[0].finish_reason == "length"
    assert steps[0].text == engine.loaded.tokenizer.decode(steps[0].token_ids, skip_special_tokens=True)


def _finished(reason: str) -> float:
    """Sequences that left the engine for `reason` so far (the labelled sample exists only once one has)."""
    return REGISTRY.get_sample_value("sluice_inference_sequences_finished_total", {"reason": reason}) or 0.0


def test_a_hung_engine_reports_stalled_and_recovers(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine()
    model = engine.loaded.model
    gate = threading.Event()
    forward = model.forward

    def hanging_forward(*args: object, **kwargs: object) -> object:
        gate.wait(30)  # a hung kernel, driver or deadlock: the loop stops making progress
        return forward(*args, **kwargs)

    model.forward = hanging_forward
    time.sleep(0.3)
    assert not engine.stalled(0.2)  # idle for a while is not stalled
    handle = engine.submit(GenerationRequest("hung", _prompts(engine, 1)[0], 3, GREEDY))
    assert wait_for(lambda: engine.stalled(0.2), timeout=5)
    gate.set()
    assert len(_ids(handle)) == 3
    assert not engine.stalled(0.2)


async def _read(handle: SequenceHandle) -> list[int]:
    return [t async for step in handle.steps() for t in step.token_ids]


def test_event_loop_readers_get_the_same_tokens_as_thread_readers(engine: Engine) -> None:
    prompts = _prompts(engine, 8)
    alone = [_ids(engine.submit(GenerationRequest(f"t{i}", p, 24, GREEDY))) for i, p in enumerate(prompts)]

    async def read_all() -> list[list[int]]:
        handles = [engine.submit(GenerationRequest(f"l{i}", p, 24, GREEDY)) for i, p in enumerate(prompts)]
        return await asyncio.gather(*(_read(h) for h in handles))

    assert asyncio.run(read_all()) == alone


def test_an_event_loop_reader_waits_without_blocking_the_loop(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(max_running=1)
    reference = _ids(engine.submit(GenerationRequest("ref", [8, 9], 5, GREEDY)))
    busy = engine.submit(GenerationRequest("busy", [5, 6, 7], 200, ENDLESS))
    next(iter(busy))  # running, and the only slot: the next request queues behind it
    queued = engine.submit(GenerationRequest("queued", [8, 9], 5, GREEDY))

    async def scenario() -> tuple[list[int], list[int]]:
        reader = asyncio.create_task(_read(queued))
        # One turn of the loop: the reader starts and waits for a first token. A reader that
        # blocked the loop instead would hold this turn until it had read everything.
        await asyncio.sleep(0)
        waited = [] if not reader.done() else reader.result()
        busy.cancel()
        return waited, await asyncio.wait_for(reader, 30)

    waited, tokens = asyncio.run(scenario())
    assert waited == [] and tokens == reference


def test_a_reader_whose_loop_closed_does_not_disturb_the_batch(engine: Engine) -> None:
    prompts = _prompts(engine, 2)
    reference = _ids(engine.submit(GenerationRequest("r", prompts[1], 32, GREEDY)))
    abandoned = engine.submit(GenerationRequest("gone", prompts[0], 32, GREEDY))
    kept = engine.submit(GenerationRequest("kept", prompts[1], 32, GREEDY))

    async def first_step() -> None:
        async for _ in abandoned.steps():
            return  # the reader leaves, its loop closes, and the engine still delivers to it

    asyncio.run(first_step())
    assert _ids(kept) == reference
    assert wait_for(lambda: engine.running == 0), "the abandoned sequence never finished"
