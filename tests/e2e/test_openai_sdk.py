"""The mesh driven by the official openai SDK, as any OpenAI client would drive it."""

from __future__ import annotations

import openai
import pytest
from meshproc import Mesh

MODEL = "sluice-tiny"
GENERATED = "sluice_inference_generate_calls_total"  # whichever engine serves
NO_CACHE = {"Cache-Control": "no-cache"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour, please."}]


@pytest.fixture(scope="module")
def client(served: Mesh) -> openai.OpenAI:
    """Against the built-in engine, then a vLLM worker: clients see the same API whichever generates."""
    return openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=120)


def _prompt_tokens(tokenizer, messages: list[dict]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_non_streaming_chat_counts_tokens_like_the_tokenizer(client: openai.OpenAI, tokenizer) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, extra_headers=NO_CACHE
    )
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == _prompt_tokens(tokenizer, MESSAGES)
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_streamed_text_equals_non_streamed_text(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0, extra_headers=NO_CACHE
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0, stream=True, extra_headers=NO_CACHE
    )
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 5, "tokens must arrive as many deltas, not one blob"
    assert "".join(c.choices[0].delta.content for c in content_chunks) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_stream_with_include_usage_ends_with_usage_chunk(client: openai.OpenAI, tokenizer) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=NO_CACHE,
    )
    chunks = list(stream)
    *with_choices, last = chunks
    assert last.choices == []
    assert last.usage.prompt_tokens == _prompt_tokens(tokenizer, MESSAGES)
    assert last.usage.completion_tokens == 8
    assert last.usage.total_tokens == last.usage.prompt_tokens + 8
    finish = [c.choices[0].finish_reason for c in with_choices]
    assert finish[-1] == "length"
    assert all(reason is None for reason in finish[:-1])
    assert all(c.usage is None for c in with_choices)


def test_completions_endpoint_streams_and_counts(client: openai.OpenAI, tokenizer) -> None:
    prompt = "def fibonacci(n):"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_headers=NO_CACHE)
    assert whole.object == "text_completion"
    assert whole.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert whole.usage.completion_tokens == 16
    assert whole.choices[0].finish_reason == "length"
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True, extra_headers=NO_CACHE
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == whole.choices[0].text


def test_stop_string_ends_generation_and_is_never_emitted(client: openai.OpenAI) -> None:
    free = (
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0, extra_headers=NO_CACHE
        )
        .choices[0]
        .message.content
    )
    stop = free[10:13]
    expected = free[: free.index(stop)]
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0, stop=[stop], stream=True, extra_headers=NO_CACHE
    )
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_reproduces_sampled_text(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return (
            client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=20,
                temperature=1.0,
                top_p=0.9,
                seed=seed,
                extra_headers=NO_CACHE,
            )
            .choices[0]
            .message.content
        )

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_unknown_model_is_a_404_the_sdk_understands(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "gpt-4o" in caught.value.message


def test_identical_greedy_request_is_served_from_cache(client: openai.OpenAI, served: Mesh) -> None:
    messages = [{"role": "user", "content": "cache me if you can"}]
    first = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0
    )
    assert first.headers["x-sluice-cache"] == "miss"
    started = served.metric("inference", GENERATED)
    second = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0
    )
    assert second.headers["x-sluice-cache"] == "hit"
    assert served.metric("inference", GENERATED) == started
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert second.parse().usage == first.parse().usage
    # A hit replays in the same streamed shape as a live answer.
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == first.parse().choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == 10
    assert served.metric("inference", GENERATED) == started


def test_sampled_requests_are_never_cached(client: openai.OpenAI) -> None:
    reply = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0.7
    )
    assert reply.headers["x-sluice-cache"] == "bypass"


def test_logit_bias_steers_generation_and_is_validated(client: openai.OpenAI, tokenizer) -> None:
    token = tokenizer.convert_tokens_to_ids("def")
    forced = client.completions.create(
        model="sluice-tiny",
        prompt="x = 1",
        max_tokens=4,
        temperature=0,
        logit_bias={str(token): 100},
        extra_body={"ignore_eos": True},
    )
    assert forced.choices[0].text == tokenizer.decode([token] * 4)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="sluice-tiny", prompt="x", max_tokens=2, logit_bias={"999999": 5})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="sluice-tiny", prompt="x", max_tokens=2, logit_bias={"7": 101})


def test_chat_logprobs_whole_and_streamed(client: openai.OpenAI) -> None:
    ask = {
        "model": "sluice-tiny",
        "messages": [{"role": "user", "content": "logprobs"}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
        "extra_body": {"ignore_eos": True},
    }
    raw = client.chat.completions.with_raw_response.create(**ask)
    assert raw.headers["x-sluice-cache"] == "bypass"  # the cache keeps no log probabilities
    choice = raw.parse().choices[0]
    entries = choice.logprobs.content
    assert len(entries) == 6
    for entry in entries:
        alternatives = [t.logprob for t in entry.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == alternatives[0] <= 0 and entry.token == entry.top_logprobs[0].token
        assert entry.bytes == list(entry.token.encode())

    chunks = client.chat.completions.create(**ask, stream=True)
    streamed = [e for chunk in chunks for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]


def test_completion_logprobs_in_the_legacy_shape(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="sluice-tiny", prompt="def main", max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 5
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    assert all(lp <= 0 for lp in logprobs.token_logprobs)


def test_completion_logprobs_zero_lists_the_chosen_token_at_each_position(client: openai.OpenAI) -> None:
    """`logprobs: 0` asks for no alternatives, yet OpenAI's legacy API (and vLLM) still give
    `top_logprobs` a dict per token holding the chosen one; also streamed, and echoed."""
    ask = {"model": "sluice-tiny", "prompt": "def zero", "max_tokens": 4, "temperature": 0, "logprobs": 0}
    reply = client.completions.create(**ask, extra_body={"ignore_eos": True})
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == 4
    assert logprobs.top_logprobs == [{t: lp} for t, lp in zip(logprobs.tokens, logprobs.token_logprobs, strict=True)]

    chunks = client.completions.create(**ask, stream=True, extra_body={"ignore_eos": True})
    streamed = [top for chunk in chunks for c in chunk.choices if c.logprobs for top in c.logprobs.top_logprobs]
    assert streamed == logprobs.top_logprobs

    echoed = client.completions.create(**ask, echo=True, extra_body={"ignore_eos": True}).choices[0].logprobs
    assert echoed.top_logprobs[0] is None  # the prompt's first token: nothing predicted it
    pairs = zip(echoed.tokens[1:], echoed.token_logprobs[1:], strict=True)
    assert echoed.top_logprobs[1:] == [{t: lp} for t, lp in pairs]
    assert echoed.top_logprobs[-4:] == logprobs.top_logprobs


def test_logprob_options_are_validated(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="sluice-tiny", messages=messages, max_tokens=2, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(
            model="sluice-tiny", messages=messages, max_tokens=2, logprobs=True, top_logprobs=21
        )
