"""`n` > 1 through the real mesh with the openai SDK: choice i is the generation a lone request
seeded with seed + i would get, whole or streamed, with usage counting the prompt once."""

from __future__ import annotations

from collections import defaultdict

import openai
import pytest
from meshproc import Mesh

MODEL = "sluice-tiny"
NO_CACHE = {"Cache-Control": "no-cache"}
MESSAGES = [{"role": "user", "content": "Three names for a boat, please."}]
ASK = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0, extra_headers=NO_CACHE)


@pytest.fixture(scope="module")
def client(served: Mesh) -> openai.OpenAI:
    """With each engine: a vLLM worker gets each choice as a request of its own, seeded alike."""
    return openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=120)


def test_each_choice_is_the_lone_request_with_its_seed(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(n=3, seed=40, **ASK)
    alone = [client.chat.completions.create(seed=40 + i, **ASK) for i in range(3)]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.message.content for c in reply.choices] == [a.choices[0].message.content for a in alone]
    assert [c.finish_reason for c in reply.choices] == [a.choices[0].finish_reason for a in alone]
    assert len({c.message.content for c in reply.choices}) > 1
    assert reply.usage.prompt_tokens == alone[0].usage.prompt_tokens  # the prompt counts once
    assert reply.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_choices_carry_their_index_and_one_usage_chunk_ends_the_stream(client: openai.OpenAI) -> None:
    client.chat.completions.create(seed=7, **ASK)  # the prompt is in the prefix cache for both runs below
    whole = client.chat.completions.create(n=4, seed=7, **ASK)
    chunks = list(
        client.chat.completions.create(n=4, seed=7, stream=True, stream_options={"include_usage": True}, **ASK)
    )
    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, str] = {}
    roles = set()
    for chunk in chunks[:-1]:
        assert len(chunk.choices) == 1 and chunk.usage is None
        choice = chunk.choices[0]
        texts[choice.index] += choice.delta.content or ""
        roles |= {choice.index} if choice.delta.role == "assistant" else set()
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert roles == {0, 1, 2, 3}
    assert [texts[i] for i in range(4)] == [c.message.content for c in whole.choices]
    assert [finishes[i] for i in range(4)] == [c.finish_reason for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_legacy_completions_take_n_too(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL, prompt="Once upon a time", n=2, max_tokens=8, temperature=1.0, seed=3, extra_headers=NO_CACHE
    )
    alone = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=4, extra_headers=NO_CACHE
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[1].text == alone.choices[0].text


def test_too_many_choices_is_a_400_naming_n(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(n=17, **ASK)
    assert err.value.body["param"] == "n"
