"""What Dify and other OpenAI clients send, on the real mesh: the thinking switch in all three of
Dify's forms reaching a Qwen3-style chat template, template variables checked and part of the
cache key, and the legacy completions' token-id prompts, several prompts and echo (with each
engine)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from meshproc import GENERATION_PROMPT, Mesh, start_mesh, with_generation_prompt

MODEL = "sluice-tiny"
# What Qwen3's template does with the switch: thinking off closes an empty block for the model.
QWEN3_SWITCH = (
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def qwen3_style(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path, model_dir: Path) -> Iterator[Mesh]:
    """The real default model behind a template with Qwen3's thinking switch."""
    model = with_generation_prompt(model_dir, tmp_path_factory.mktemp("qwen3-style"), GENERATION_PROMPT + QWEN3_SWITCH)
    env = {"SLUICE_REASONING_TAGS": "<think>,</think>"}
    running = start_mesh(tmp_path_factory.mktemp("qwen3"), certs_dir, model, env=env)
    try:
        yield running
    finally:
        running.stop()


def _dify_extended(thinking: bool) -> dict:
    """The body Dify's OpenAI-API-compatible provider sends in compatibility mode "extended" for a
    model that supports both modes (models/llm/llm.py of langgenius/dify-official-plugins)."""
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": False,
        "chat_template_kwargs": {"enable_thinking": thinking, "thinking": thinking},
        "thinking": {"type": "enabled" if thinking else "disabled"},
        "enable_thinking": thinking,
    }


def _post(mesh: Mesh, body: dict, path: str = "/chat/completions") -> httpx.Response:
    return httpx.post(mesh.base_url + path, json=body, headers={"Cache-Control": "no-cache"}, timeout=60)


def test_difys_thinking_switch_changes_the_prompt_and_off_means_no_reasoning(qwen3_style: Mesh, tokenizer) -> None:
    on, off = (_post(qwen3_style, _dify_extended(thinking)).json() for thinking in (True, False))
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    template = (qwen3_style.model_dir / "chat_template.jinja").read_text()
    rendered = {
        thinking: tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, enable_thinking=thinking
        )["input_ids"]
        for thinking in (True, False)
    }
    assert "<think>\n\n</think>" in tokenizer.decode(rendered[False]) and len(rendered[False]) > len(rendered[True])
    assert on["usage"]["prompt_tokens"] == len(rendered[True])
    assert off["usage"]["prompt_tokens"] == len(rendered[False])
    message = off["choices"][0]["message"]
    assert message["content"] and "reasoning_content" not in message and "reasoning" not in message


@pytest.mark.parametrize(
    "switch",
    [
        {"enable_thinking": False},
        {"thinking": {"type": "disabled"}},
        {"chat_template_kwargs": {"enable_thinking": False}},
    ],
)
def test_each_form_of_the_switch_alone_turns_thinking_off(qwen3_style: Mesh, switch: dict) -> None:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    default, switched = (_post(qwen3_style, base | extra).json() for extra in ({}, switch))
    assert switched["usage"]["prompt_tokens"] > default["usage"]["prompt_tokens"]


def test_kwargs_win_over_the_top_level_switch_and_reasoning_effort_is_accepted(qwen3_style: Mesh) -> None:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    plain = _post(qwen3_style, base).json()["usage"]["prompt_tokens"]
    both = base | {
        "enable_thinking": False,
        "chat_template_kwargs": {"enable_thinking": True},
        "reasoning_effort": "low",
    }
    reply = _post(qwen3_style, both)
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == plain


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"add_generation_prompt": False}, "add_generation_prompt: is set by the chat template's renderer"),
        ({"messages": []}, "messages: is set by the chat template's renderer"),
        ({"bos_token": "x"}, "bos_token: is set by the chat template's renderer"),
        ({"not a name": 1}, "is not a template variable name"),
        ({f"v{i}": i for i in range(40)}, "at most 32 variables"),
        ({"big": "x" * 20_000}, "at most 16384 bytes"),
    ],
)
def test_template_variables_the_renderer_owns_or_that_are_too_big_are_400(
    qwen3_style: Mesh, kwargs: dict, needle: str
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": kwargs}
    reply = _post(qwen3_style, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "chat_template_kwargs" and needle in reply.json()["error"]["message"]


def test_template_variables_are_part_of_the_cache_key(qwen3_style: Mesh) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "cache me"}], "max_tokens": 4, "temperature": 0}

    def cache(extra: dict) -> str:
        url = f"{qwen3_style.base_url}/chat/completions"
        return httpx.post(url, json=body | extra, timeout=60).headers["x-sluice-cache"]

    # A variable this template ignores renders the same prompt, but the key still tells them apart.
    assert cache({"chat_template_kwargs": {"tone": "a"}}) == "miss"
    assert cache({"chat_template_kwargs": {"tone": "a"}}) == "hit"
    assert cache({"chat_template_kwargs": {"tone": "b"}}) == "miss"


# ---------------------------------------------------------------- legacy completions


def _complete(mesh: Mesh, **body: object) -> dict:
    reply = httpx.post(f"{mesh.base_url}/completions", json={"model": MODEL, "max_tokens": 3, **body}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_prompt_of_token_ids_is_that_prompt(served: Mesh, tokenizer) -> None:
    ids = tokenizer("The river reached the gate")["input_ids"]
    as_ids = _complete(served, prompt=ids, temperature=0)
    as_text = _complete(served, prompt="The river reached the gate", temperature=0)
    assert as_ids["usage"]["prompt_tokens"] == len(ids) == as_text["usage"]["prompt_tokens"]
    assert as_ids["choices"][0]["text"] == as_text["choices"][0]["text"]
    outside = httpx.post(f"{served.base_url}/completions", json={"model": MODEL, "prompt": [0, 10**6]}, timeout=60)
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "prompt"


def test_several_prompts_give_n_choices_each_numbered_as_openai_does(served: Mesh, tokenizer) -> None:
    prompts = ["Hi", "The river reached the gate and"]
    reply = _complete(served, prompt=prompts, n=2, temperature=0, seed=7)
    choices = reply["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    one = [_complete(served, prompt=p, temperature=0)["choices"][0]["text"] for p in prompts]
    assert [choices[0]["text"], choices[2]["text"]] == one  # choice p*n + i is prompt p's i-th
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert reply["usage"]["prompt_tokens"] == prompt_tokens  # each prompt counted once
    assert reply["usage"]["completion_tokens"] == sum(3 for _ in choices)
    token_lists = [tokenizer(p)["input_ids"] for p in prompts]
    assert [c["text"] for c in _complete(served, prompt=token_lists, temperature=0)["choices"]] == one


def test_echo_returns_the_prompt_first_with_its_logprobs(served: Mesh, tokenizer) -> None:
    prompt = "The river reached the gate"
    plain = _complete(served, prompt=prompt, temperature=0)["choices"][0]["text"]
    echoed = _complete(served, prompt=prompt, temperature=0, echo=True)["choices"][0]
    assert echoed["text"] == prompt + plain
    scored = _complete(served, prompt=prompt, temperature=0, echo=True, logprobs=1)["choices"][0]
    ids = tokenizer(prompt)["input_ids"]
    logprobs = scored["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None  # nothing predicts it
    assert all(lp is not None and lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert "".join(logprobs["tokens"]) == scored["text"]
    assert logprobs["text_offset"][len(ids)] == len(prompt)


def test_echo_streams_the_prompt_in_the_first_chunk(served: Mesh) -> None:
    client = openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0)
    prompt = "The river reached the gate"
    chunks = list(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, stream=True)
    )
    assert chunks[0].choices[0].text == prompt
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/chat/completions", {"thinking": {"type": "maybe"}}, "thinking.type"),
        ("/chat/completions", {"enable_thinking": "yes please"}, "enable_thinking"),
        ("/chat/completions", {"reasoning_effort": "extreme"}, "reasoning_effort"),
        ("/chat/completions", {"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
        ("/completions", {"prompt": [[]]}, "prompt"),
        ("/completions", {"prompt": ["a"] * 33}, "prompt"),
        ("/completions", {"prompt": ["a", "b"], "n": 40}, "n"),
        ("/completions", {"prompt": "a", "echo": "loud"}, "echo"),
    ],
)
def test_what_clients_may_send_is_checked_naming_the_field(mesh: Mesh, path: str, extra: dict, param: str) -> None:
    body = {"model": MODEL, "max_tokens": 2}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if path == "/chat/completions" else {"prompt": "hi"}
    reply = httpx.post(mesh.base_url + path, json=body | extra, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"].startswith(param)
