"""Tool calling through the real edge and preprocess, driven by the `openai` SDK.

The default model's gibberish never calls a tool, so a scripted inference service (a test
fixture announcing the Hermes format, as a Qwen2.5 instance does) writes the calls; the
prompts it receives are decoded to check what the chat template was given. The real default
model then shows a request with tools is accepted and answered well-formed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from meshproc import Edge, Mesh
from scripted_inference import ScriptedModel, scripted_edge

from services.mesh.stubs import inference_pb2

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# What the scripted model writes, by max_tokens (the request's way to choose a script).
SCRIPTS = {
    30: ["Checking.", "<tool", '_call>\n{"name": "get_wea', 'ther", "arguments": {"city": ', '"Paris"}}\n</tool_call>'],
    31: ['{"city": "Oslo"}}', "\n</tool_call>"],  # the rest of a call the edge forced
    32: ["No tools ", "needed."],
}


@pytest.fixture(scope="module")
def scripted() -> ScriptedModel:
    info = inference_pb2.ModelInfo(id="sluice-tiny", kind="chat", context_length=2048, tool_parser="hermes")
    return ScriptedModel(info, lambda request, _: SCRIPTS[request.sampling.max_tokens])


@pytest.fixture(scope="module")
def tools_edge(mesh: Mesh, scripted: ScriptedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    with scripted_edge(mesh, tmp_path_factory.mktemp("tools"), scripted) as edge:
        yield edge


def _client(edge: Edge) -> openai.OpenAI:
    return openai.OpenAI(base_url=edge.base_url, api_key="unused", max_retries=0)


def _ask(edge: Edge, max_tokens: int, **extra: object):
    return _client(edge).chat.completions.create(
        model="sluice-tiny",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        max_tokens=max_tokens,
        tools=[WEATHER],
        extra_headers={"Cache-Control": "no-cache"},
        **extra,
    )


def _last_prompt(scripted: ScriptedModel, tokenizer) -> str:
    return tokenizer.decode(scripted.prompts[-1])


def test_a_call_comes_back_whole_with_finish_reason_tool_calls(tools_edge: Edge, scripted, tokenizer) -> None:
    choice = _ask(tools_edge, 30).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # The chat template was given the tools.
    prompt = _last_prompt(scripted, tokenizer)
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt


def test_a_streamed_call_opens_with_its_name_then_sends_only_arguments(tools_edge: Edge) -> None:
    pieces, content, finish = [], "", None
    for chunk in _ask(tools_edge, 30, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            pieces += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and content == "Checking."
    first, *rest = pieces
    assert (first.index, first.type, first.function.name) == (0, "function", "get_weather") and first.id
    assert rest and all(p.index == 0 and p.id is None and p.function.name is None for p in rest)
    arguments = first.function.arguments + "".join(p.function.arguments for p in rest)
    assert json.loads(arguments) == {"city": "Paris"}


def test_a_named_tool_choice_forces_that_call(tools_edge: Edge, scripted, tokenizer) -> None:
    choice = _ask(tools_edge, 31, tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    assert _last_prompt(scripted, tokenizer).endswith('<tool_call>\n{"name": "get_weather", "arguments": ')
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    assert choice.finish_reason == "tool_calls"


def test_tool_choice_none_withdraws_the_tools(tools_edge: Edge, scripted, tokenizer) -> None:
    choice = _ask(tools_edge, 32, tool_choice="none").choices[0]
    assert "<tools>" not in _last_prompt(scripted, tokenizer)
    assert choice.message.content == "No tools needed." and choice.message.tool_calls is None
    assert choice.finish_reason == "stop"


def test_tool_results_go_back_into_the_template(tools_edge: Edge, scripted, tokenizer) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    _client(tools_edge).chat.completions.create(
        model="sluice-tiny",
        max_tokens=32,
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
        ],
    )
    prompt = _last_prompt(scripted, tokenizer)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in prompt


def test_a_named_tool_that_is_not_offered_is_400(tools_edge: Edge) -> None:
    with pytest.raises(openai.BadRequestError, match="no tool named"):
        _ask(tools_edge, 30, tool_choice={"type": "function", "function": {"name": "launch_rocket"}})


def test_the_default_model_accepts_tools_and_answers_well_formed(mesh: Mesh) -> None:
    client = openai.OpenAI(base_url=mesh.base_url, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="sluice-tiny",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER],
        max_tokens=8,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content is not None or choice.message.tool_calls
    assert reply.usage.completion_tokens <= 8
