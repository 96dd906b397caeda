"""The vLLM engine's side of the protocol, against a scripted worker that speaks vLLM's real gRPC
service (smg-grpc-proto's VllmEngine) on loopback: what is sent for a request, how the streamed
token ids become Sluice's steps (text, stop strings, log probabilities, usage), and that a
request stopped or cancelled on this side is aborted in the worker. The real worker is driven
end to end in tests/e2e/test_vllm_worker.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from smg_grpc_proto.generated import vllm_engine_pb2, vllm_engine_pb2_grpc

from services.inference.engine_api import GenerationRequest, SamplingConfig, Step
from services.inference.loader import load_tokenizer
from services.inference.vllm_engine import VllmEngine, WorkerModel, request_params
from services.mesh.contracts.errors import InvalidArgument, Unavailable

GREEDY = SamplingConfig(temperature=0)


class ScriptedWorker(vllm_engine_pb2_grpc.VllmEngineServicer):
    """Streams the token ids a test scripts, one chunk each, then the worker's complete message;
    records requests and aborts."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.healthy = True
        self.requests: list[vllm_engine_pb2.GenerateRequest] = []
        self.aborted: list[str] = []
        self.fail_with: grpc.StatusCode | None = None
        self.finish: str | None = None  # the complete message's reason; by default as vLLM's would be
        self.release = threading.Event()  # each chunk after the first waits for it, when not set
        self.release.set()

    def Generate(self, request, context):
        self.requests.append(request)
        if self.fail_with is not None:
            context.abort(self.fail_with, "scripted failure")
        wanted = min(len(self.tokens), request.sampling_params.max_tokens)
        for i, token in enumerate(self.tokens[:wanted]):
            if i and not self.release.wait(10):
                return
            chunk = vllm_engine_pb2.GenerateStreamChunk(
                token_ids=[token], prompt_tokens=len(request.tokenized.input_ids), completion_tokens=i + 1
            )
            if request.sampling_params.HasField("logprobs"):
                chunk.output_logprobs.token_ids.append(token)
                chunk.output_logprobs.token_logprobs.append(-0.5)
                top = chunk.output_logprobs.top_logprobs.add()
                top.token_ids.extend([token, token + 1, token + 2])  # the sampled one leads, as vLLM's do
                top.values.extend([-0.5, -0.25, -3.0])
            yield vllm_engine_pb2.GenerateResponse(chunk=chunk)
        prompt = len(request.tokenized.input_ids)
        finish = self.finish or ("length" if wanted == request.sampling_params.max_tokens else "stop")
        done = vllm_engine_pb2.GenerateComplete(
            finish_reason=finish, prompt_tokens=prompt, completion_tokens=wanted, cached_tokens=3
        )
        yield vllm_engine_pb2.GenerateResponse(complete=done)

    def HealthCheck(self, request, context):
        return vllm_engine_pb2.HealthCheckResponse(healthy=self.healthy)

    def GetLoads(self, request, context):
        load = vllm_engine_pb2.SchedulerLoad(
            num_running_reqs=2, num_waiting_reqs=1, num_used_tokens=320, max_total_num_tokens=1600
        )
        return vllm_engine_pb2.GetLoadsResponse(loads=[load])

    def Abort(self, request, context):
        self.aborted.extend(request.request_ids)
        return vllm_engine_pb2.AbortResponse()


@pytest.fixture
def worker(model_dir: Path) -> Iterator[tuple[ScriptedWorker, VllmEngine]]:
    tokenizer, eos = load_tokenizer(model_dir)
    tokens = tokenizer("hello world and more words", add_special_tokens=False)["input_ids"]
    scripted = ScriptedWorker(tokens)
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(scripted, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    engine = VllmEngine(f"127.0.0.1:{port}", WorkerModel("sluice-tiny", tokenizer, eos, 2048, 4096))
    try:
        assert engine.wait_healthy(10)
        yield scripted, engine
    finally:
        engine.close()
        server.stop(0)


def _run(engine: VllmEngine, request: GenerationRequest) -> list[Step]:
    async def collect() -> list[Step]:
        return [step async for step in engine.submit(request).steps()]

    return asyncio.run(collect())


def test_every_sampling_setting_reaches_the_worker() -> None:
    sampling = SamplingConfig(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=1.1,
        ignore_eos=True,
        logit_bias=((5, 2.0),),
    )
    schema = '{"type":"object"}'
    params = request_params(GenerationRequest("r", [1, 2], 9, sampling, (), 3, schema, 1))
    assert (params.top_k, params.max_tokens, params.seed, params.n, params.ignore_eos) == (40, 9, 7, 1, True)
    floats = (params.temperature, params.top_p, params.min_p, params.presence_penalty, params.frequency_penalty)
    assert floats == pytest.approx((0.7, 0.9, 0.05, 0.5, 0.25))
    assert params.repetition_penalty == pytest.approx(1.1) and dict(params.logit_bias) == {5: pytest.approx(2.0)}
    assert (params.logprobs, params.prompt_logprobs, params.json_schema) == (3, 1, schema)
    plain = request_params(GenerationRequest("p", [1], 4, GREEDY))
    assert not plain.HasField("seed") and not plain.HasField("logprobs") and plain.WhichOneof("constraint") is None


def test_a_seed_the_worker_cannot_take_is_refused_naming_the_field_and_the_engine() -> None:
    with pytest.raises(InvalidArgument, match="seed: the vllm engine takes 32-bit seeds") as refused:
        request_params(GenerationRequest("s", [1], 4, SamplingConfig(seed=2**40)))
    assert refused.value.param == "seed"


def test_streamed_token_ids_become_text_log_probabilities_and_usage(worker, model_dir: Path) -> None:
    scripted, engine = worker
    steps = _run(engine, GenerationRequest("a", [1, 2, 3], 64, GREEDY, top_logprobs=2))
    tokenizer = engine.model.tokenizer
    ids = [t for step in steps for t in step.token_ids]
    assert ids == scripted.tokens
    assert "".join(step.text for step in steps) == tokenizer.decode(ids)
    last = steps[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens, last.cached_tokens) == (
        "stop" if len(ids) < 64 else "length",
        3,
        len(ids),
        3,
    )
    entries = [entry for step in steps for entry in step.logprobs]
    assert len(entries) == len(ids)
    # The worker's alternatives, best first and as many as asked for: the sampled token (-0.5)
    # is not the best here.
    assert all(e.top == ((e.token_id + 1, -0.25), (e.token_id, -0.5)) for e in entries)
    (sent,) = scripted.requests
    assert list(sent.tokenized.input_ids) == [1, 2, 3] and sent.stream


def test_max_tokens_finishes_with_length(worker) -> None:
    _, engine = worker
    steps = _run(engine, GenerationRequest("m", [1], 2, GREEDY))
    assert [t for s in steps for t in s.token_ids] and steps[-1].finish_reason == "length"
    assert steps[-1].completion_tokens == 2


def test_a_stop_string_ends_the_stream_here_and_aborts_it_in_the_worker(worker) -> None:
    scripted, engine = worker
    steps = _run(engine, GenerationRequest("b", [1], 64, GREEDY, stop=("world",)))
    assert "".join(step.text for step in steps) == "hello "
    assert steps[-1].finish_reason == "stop"
    assert scripted.aborted == [sent.request_id for sent in scripted.requests]


def test_a_cancelled_generation_is_aborted_in_the_worker(worker) -> None:
    scripted, engine = worker
    scripted.release.clear()  # the worker sends its first token, then waits

    async def cancel_after_first() -> list[Step]:
        generation = engine.submit(GenerationRequest("c", [1], 64, GREEDY))
        seen = []
        async for step in generation.steps():
            seen.append(step)
            generation.cancel()
        return seen

    seen = asyncio.run(cancel_after_first())
    scripted.release.set()
    assert len(seen) == 1 and seen[0].finish_reason is None
    assert scripted.aborted == [sent.request_id for sent in scripted.requests]


def test_choices_of_one_request_are_separate_requests_in_the_worker(worker) -> None:
    """n choices share the edge's request id; the worker keys requests by id, so each needs its own."""
    scripted, engine = worker

    async def steps_of(choice) -> list[Step]:
        return [step async for step in choice.steps()]

    async def two_choices() -> list[list[Step]]:
        choices = [engine.submit(GenerationRequest("e", [1], 3, GREEDY)) for _ in range(2)]
        return await asyncio.gather(*map(steps_of, choices))

    first, second = asyncio.run(two_choices())
    assert [t for s in first for t in s.token_ids] == [t for s in second for t in s.token_ids] == scripted.tokens[:3]
    ids = [sent.request_id for sent in scripted.requests]
    assert len(ids) == 2 and len(set(ids)) == 2


def test_a_request_the_worker_aborts_on_its_own_fails_rather_than_ending_short(worker) -> None:
    scripted, engine = worker
    scripted.finish = "abort"
    with pytest.raises(Unavailable, match="aborted"):
        _run(engine, GenerationRequest("f", [1], 64, GREEDY))


def test_a_failed_worker_makes_the_instance_unavailable(worker) -> None:
    scripted, engine = worker
    scripted.fail_with = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(Unavailable):
        _run(engine, GenerationRequest("d", [1], 4, GREEDY))


def test_health_and_load_are_the_workers(worker) -> None:
    scripted, engine = worker
    load = engine.load()
    assert (load.running, load.waiting, load.kv_blocks_total, load.kv_blocks_free) == (2, 1, 100, 80)
    assert not engine.stalled(0.0)
    scripted.healthy = False
    deadline = asyncio.run(_eventually(lambda: engine.stalled(0.2)))
    assert deadline and not engine.healthy
    scripted.healthy = True
    assert engine.wait_healthy(5) and not engine.stalled(0.0)


async def _eventually(condition, timeout_s: float = 5.0) -> bool:
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return False
