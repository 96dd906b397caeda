"""Prefix caching and prefix-aware routing through the real mesh with two inference replicas,
driven by the openai SDK: cached_tokens is exact whole and streamed, every warm request of a
system prompt lands where that prompt was computed, `n` choices share their prompt, and a killed
replica's prefixes move to the survivor."""

from __future__ import annotations

import os
import signal

import grpc
import openai
import pytest
from meshproc import Mesh, wait_for

from services.mesh.rpc.certs import ca_paths, service_paths
from services.mesh.stubs import common_pb2, inference_pb2, inference_pb2_grpc

MODEL = "sluice-tiny"
NO_CACHE = {"Cache-Control": "no-cache"}  # the completion cache must not answer: the engine does
BLOCK = 16  # the engine's kv_block_size (the default)
REPLICAS = ("inference", "inference-2")


@pytest.fixture
def client(replicated: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=replicated.base_url, api_key="unused", max_retries=0, timeout=120)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _system(tokenizer, index: int, length: int = 150) -> list[int]:
    """A system prompt of `length` tokens (not a whole number of blocks: it ends mid-block)."""
    ids = _ids(tokenizer, f"System prompt number {index}. " + "You answer briefly about lorem ipsum dolor. " * 40)
    return ids[:length]


def _expected(shared: int, prompt_tokens: int) -> int:
    """Cached tokens of a warm prompt: the shared prefix's full blocks, never its last token."""
    return min(shared // BLOCK, (prompt_tokens - 1) // BLOCK) * BLOCK


def _complete(client: openai.OpenAI, prompt: list[int], **extra: object) -> openai.types.Completion:
    ask: dict = {"max_tokens": 4, "temperature": 0, **extra}
    return client.completions.create(model=MODEL, prompt=prompt, extra_headers=NO_CACHE, **ask)


def _hits(mesh: Mesh) -> float:
    return sum(mesh.metric(r, "sluice_inference_prefix_cache_hit_tokens_total") for r in REPLICAS)


def test_cached_tokens_are_exact_whole_and_streamed(client: openai.OpenAI, tokenizer) -> None:
    system = _system(tokenizer, 100)
    cold = _complete(client, system + _ids(tokenizer, " first question?"))
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    prompt = system + _ids(tokenizer, " second question, a little longer?")
    warm = _complete(client, prompt)
    assert warm.usage.prompt_tokens == len(prompt)
    assert warm.usage.prompt_tokens_details.cached_tokens == _expected(len(system), len(prompt))
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=NO_CACHE,
        )
    )
    usage = chunks[-1].usage
    # The whole prompt was computed once now: everything but its last block's tail is cached.
    assert usage.prompt_tokens_details.cached_tokens == _expected(len(prompt), len(prompt))
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello " * 60}], max_tokens=3, extra_headers=NO_CACHE
    )
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello " * 60}], max_tokens=3, extra_headers=NO_CACHE
    )
    assert chat.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == _expected(
        chat.usage.prompt_tokens, chat.usage.prompt_tokens
    )


def test_each_system_prompt_is_served_where_it_was_computed(replicated: Mesh, client: openai.OpenAI, tokenizer) -> None:
    systems = [_system(tokenizer, i) for i in range(6)]
    started = {r: replicated.metric(r, "sluice_inference_sequences_started_total") for r in REPLICAS}
    hits_before = _hits(replicated)
    expected = 0
    for round_ in range(3):
        for i, system in enumerate(systems):
            prompt = system + _ids(tokenizer, f" question {round_} about {i}?")
            reply = _complete(client, prompt)
            want = _expected(len(system), len(prompt)) if round_ else 0
            assert reply.usage.prompt_tokens_details.cached_tokens == want, (round_, i)
            expected += want
    # Every warm request found its prefix: a balancer blind to prefixes would miss about half.
    assert _hits(replicated) - hits_before == expected
    # ...and the distinct prefixes were spread over both replicas, not piled on one.
    assert all(replicated.metric(r, "sluice_inference_sequences_started_total") - started[r] >= 6 for r in REPLICAS)


def test_n_choices_compute_their_prompt_once(replicated: Mesh, client: openai.OpenAI, tokenizer) -> None:
    prompt = _system(tokenizer, 200, 120) + _ids(tokenizer, " pick three words")
    hits_before = _hits(replicated)
    reply = _complete(client, prompt, n=3, seed=5, temperature=1.0)
    assert len(reply.choices) == 3
    assert reply.usage.prompt_tokens_details.cached_tokens == 0  # new to the mesh: choice 0 computed it
    # Choices 1 and 2 read choice 0's blocks on the same replica.
    assert _hits(replicated) - hits_before == 2 * _expected(len(prompt), len(prompt))


def test_a_killed_replicas_prefixes_move_to_the_survivor(replicated: Mesh, client: openai.OpenAI, tokenizer) -> None:
    systems = [_system(tokenizer, 300 + i) for i in range(4)]
    for system in systems:
        _complete(client, [*system, 7])
    victim = replicated.child("inference-2")["pid"]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: replicated.health().json()["status"] != "ok", timeout=15), "the kill went unnoticed"
    for i, system in enumerate(systems):
        _complete(client, [*system, 8])  # computed again where the victim's prefixes went
        prompt = [*system, 9]
        reply = _complete(client, prompt)
        assert reply.usage.prompt_tokens_details.cached_tokens == _expected(len(system), len(prompt)), i


def test_an_instance_pushes_its_load_as_it_changes(mesh: Mesh) -> None:
    """What the edge routes by: WatchLoad reports at once, then when a sequence runs and leaves."""
    own = service_paths(mesh.certs_dir, "edge")
    creds = grpc.ssl_channel_credentials(
        ca_paths(mesh.certs_dir).cert.read_bytes(), own.key.read_bytes(), own.cert.read_bytes()
    )
    endless = inference_pb2.GenerateRequest(
        request_id="load",
        token_ids=[5, 6, 7] * 20,
        sampling=common_pb2.SamplingParams(max_tokens=1000, ignore_eos=True),
    )
    with grpc.secure_channel(mesh.address("inference"), creds) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        reports = stub.WatchLoad(inference_pb2.WatchLoadRequest(), timeout=60)
        idle = next(reports)
        assert idle.running == 0 and idle.waiting == 0
        assert 0 < idle.kv_blocks_free == idle.kv_blocks_total
        call = stub.Generate(endless, timeout=60)
        next(call)
        busy = next(r for r in reports if r.running == 1)
        assert busy.kv_blocks_free < busy.kv_blocks_total
        call.cancel()
        assert next(r for r in reports if r.running == 0).kv_blocks_free == idle.kv_blocks_total
        reports.cancel()
