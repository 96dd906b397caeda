from __future__ import annotations

import pytest

from services.mesh.contracts.errors import ContextLengthExceeded, InvalidArgument
from services.mesh.stubs import common_pb2
from services.preprocess.cache_keys import cache_key, is_deterministic
from services.preprocess.templates import Message, Part, render_chat, template_variables, to_template_messages
from services.preprocess.validate import resolve_sampling


def _params(**kw) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**kw)


def test_unset_max_tokens_takes_the_room_left_in_the_context_up_to_the_limit() -> None:
    resolved = resolve_sampling(_params(temperature=0, top_p=0.5), prompt_tokens=100, context_length=2048)
    assert resolved.max_tokens == 1948
    assert resolved.top_p == 0.5  # the caller's decision, passed on as it is
    assert resolve_sampling(_params(), prompt_tokens=100, context_length=2048, limit=64).max_tokens == 64
    assert resolve_sampling(_params(), prompt_tokens=2000, context_length=2048, limit=64).max_tokens == 48
    assert resolve_sampling(_params(max_tokens=10), prompt_tokens=100, context_length=2048, limit=64).max_tokens == 10
    with pytest.raises(InvalidArgument, match="at most 64"):
        resolve_sampling(_params(max_tokens=65), prompt_tokens=100, context_length=2048, limit=64)


def test_max_tokens_beyond_the_context_is_rejected_naming_the_numbers() -> None:
    with pytest.raises(ContextLengthExceeded, match=r"2048.*2100") as caught:
        resolve_sampling(_params(max_tokens=2000), prompt_tokens=100, context_length=2048)
    assert caught.value.param == "max_tokens"


def test_prompt_filling_the_context_is_rejected() -> None:
    with pytest.raises(ContextLengthExceeded):
        resolve_sampling(_params(), prompt_tokens=2048, context_length=2048)


def test_empty_prompt_is_rejected() -> None:
    with pytest.raises(InvalidArgument):
        resolve_sampling(_params(), prompt_tokens=0, context_length=2048)


def test_only_deterministic_requests_get_a_cache_key() -> None:
    assert is_deterministic(_params(temperature=0))
    assert is_deterministic(_params(temperature=0.8, seed=3))
    assert not is_deterministic(_params(temperature=0.8))
    assert cache_key("m", [1, 2], _params(temperature=0.8)) == ""


def test_cache_key_covers_model_tokens_and_every_parameter() -> None:
    base = cache_key("m", [1, 2, 3], _params(temperature=0, max_tokens=5))
    assert base == cache_key("m", [1, 2, 3], _params(temperature=0, max_tokens=5))
    variants = [
        cache_key("other", [1, 2, 3], _params(temperature=0, max_tokens=5)),
        cache_key("m", [1, 2, 4], _params(temperature=0, max_tokens=5)),
        cache_key("m", [1, 2, 3], _params(temperature=0, max_tokens=6)),
        cache_key("m", [1, 2, 3], _params(temperature=0, max_tokens=5, stop=["x"])),
        cache_key("m", [1, 2, 3], _params(temperature=0, max_tokens=5, frequency_penalty=0.1)),
        cache_key("m", [1, 2, 3], _params(temperature=0, max_tokens=5, seed=1)),
        cache_key("m", [1, 2, 3], _params(temperature=0, max_tokens=5), '{"enable_thinking":false}'),
    ]
    assert len({base, *variants}) == 1 + len(variants)


def test_text_parts_are_joined_and_names_kept() -> None:
    messages = [Message("user", (Part("text", "a"), Part("text", "b")), name="alice")]
    assert to_template_messages(messages, "m") == [{"role": "user", "content": "a\nb", "name": "alice"}]


def test_unknown_role_is_rejected_naming_the_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        to_template_messages([Message("user", ()), Message("robot", ())], "m")
    assert caught.value.param == "messages[1].role"


def test_image_part_for_a_text_model_names_the_model() -> None:
    with pytest.raises(InvalidArgument, match="tiny-model"):
        to_template_messages([Message("user", (Part("image_url"),))], "tiny-model")


def test_render_uses_the_models_chat_template(tokenizer) -> None:
    prompt = render_chat(tokenizer, [Message("user", (Part("text", "hi"),))], "m")
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_template_variables_reach_the_template(tokenizer) -> None:
    template = "{{ messages[0].content }}|{{ enable_thinking }}|{{ reasoning_effort | default('none') }}"
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)  # a copy to change
    tokenizer.chat_template = template
    prompt = render_chat(tokenizer, [Message("user", (Part("text", "hi"),))], "m", variables={"enable_thinking": False})
    assert prompt == "hi|False|none"


@pytest.mark.parametrize(
    ("variables_json", "needle"),
    [
        ('{"add_generation_prompt": false}', "chat_template_kwargs.add_generation_prompt: is set by the"),
        ('{"eos_token": "x"}', "chat_template_kwargs.eos_token: is set by the"),
        ('{"9lives": 1}', "is not a template variable name"),
        ("[1, 2]", "chat_template_kwargs must be an object"),
        ('{"a": ' + "[" * 100 + "]" * 100 + "}", "nests deeper than 64 levels"),
    ],
)
def test_template_variables_are_checked_for_direct_callers(variables_json: str, needle: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        template_variables(variables_json)
    assert needle in refused.value.message and refused.value.param == "chat_template_kwargs"
    assert template_variables('{"enable_thinking": true, "x": [1, {"y": null}]}') == {
        "enable_thinking": True,
        "x": [1, {"y": None}],
    }
