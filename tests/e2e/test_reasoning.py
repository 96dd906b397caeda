"""Reasoning output reaches clients as `reasoning_content` and `reasoning`, apart from the answer.

The default model's gibberish never opens a reasoning block, so a scripted inference service
(a test fixture: real gRPC over the mesh's mTLS, announcing `<think>` tags as a reasoning
model's instance does) streams one, with the tags split across chunks, to a real edge and
preprocess. The real default model is then checked to answer well-formed without the field,
and behind a DeepSeek-R1-style template (which opens `<think>` at the end of the prompt) to
answer with its whole output as reasoning, never as content.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from meshproc import Edge, Mesh, start_mesh, with_generation_prompt
from scripted_inference import ScriptedModel, scripted_edge

from services.mesh.stubs import inference_pb2

SCRIPT = ["<th", "ink>Two plus", " two is four.</thi", "nk>\n\n", "It is ", "4."]


@pytest.fixture(scope="module")
def reasoning_edge(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    info = inference_pb2.ModelInfo(
        id="sluice-tiny", kind="chat", context_length=2048, reasoning_open="<think>", reasoning_close="</think>"
    )
    with scripted_edge(mesh, tmp_path_factory.mktemp("reasoning"), ScriptedModel(info, lambda *_: SCRIPT)) as edge:
        yield edge


def _chat(base_url: str, **extra: object):
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    return client.chat.completions.create(
        model="sluice-tiny",
        messages=[{"role": "user", "content": "2+2?"}],
        max_tokens=16,
        extra_headers={"Cache-Control": "no-cache"},
        **extra,
    )


def _streamed(base_url: str) -> dict[str, str]:
    """Each delta field's text, joined over the stream."""
    joined = {"reasoning_content": "", "reasoning": "", "content": ""}
    for chunk in _chat(base_url, stream=True):
        for choice in chunk.choices:
            for name in joined:
                joined[name] += getattr(choice.delta, name, None) or ""
    return joined


def test_streamed_reasoning_arrives_under_both_names_never_as_content(reasoning_edge: Edge) -> None:
    # DeepSeek's name (Dify and most clients) and vLLM's newer one, so either kind of client reads it.
    assert _streamed(reasoning_edge.base_url) == {
        "reasoning_content": "Two plus two is four.",
        "reasoning": "Two plus two is four.",
        "content": "It is 4.",
    }


def test_whole_response_carries_the_reasoning_under_both_names(reasoning_edge: Edge) -> None:
    message = _chat(reasoning_edge.base_url).choices[0].message
    assert message.content == "It is 4."
    assert message.reasoning_content == message.reasoning == "Two plus two is four."  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def reasoning_only_edge(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    info = inference_pb2.ModelInfo(
        id="sluice-tiny", kind="chat", context_length=2048, reasoning_open="<think>", reasoning_close="</think>"
    )
    model = ScriptedModel(info, lambda *_: SCRIPT)
    workdir = tmp_path_factory.mktemp("reasoning-only")
    with scripted_edge(mesh, workdir, model, "--reasoning-field", "reasoning") as edge:
        yield edge


def test_the_reasoning_field_setting_picks_one_name(reasoning_only_edge: Edge) -> None:
    streamed = _streamed(reasoning_only_edge.base_url)
    assert (streamed["reasoning"], streamed["reasoning_content"]) == ("Two plus two is four.", "")
    message = _chat(reasoning_only_edge.base_url).choices[0].message.model_dump(exclude_unset=True)
    assert message["reasoning"] == "Two plus two is four." and "reasoning_content" not in message


def test_a_model_without_reasoning_tags_answers_without_the_field(mesh: Mesh) -> None:
    reply = _chat(mesh.base_url, temperature=0)
    assert reply.choices[0].message.content
    message = reply.choices[0].message.model_dump(exclude_unset=True)
    assert "reasoning_content" not in message and "reasoning" not in message


@pytest.fixture(scope="module")
def opened_mesh(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path, model_dir: Path) -> Iterator[Mesh]:
    """The real default model with a template that ends the prompt inside `<think>`, as R1's does."""
    opened = "'<|im_start|>assistant\\n<think>\\n' }}"
    model = with_generation_prompt(model_dir, tmp_path_factory.mktemp("r1-style"), opened)
    running = start_mesh(
        tmp_path_factory.mktemp("opened"), certs_dir, model, env={"SLUICE_REASONING_TAGS": "<think>,</think>"}
    )
    try:
        yield running
    finally:
        running.stop()


def test_a_block_the_template_opened_is_reasoning_content_on_the_real_model(opened_mesh: Mesh) -> None:
    message = _chat(opened_mesh.base_url, temperature=0).choices[0].message
    # The gibberish never closes the block: all of it is reasoning, none of it answer.
    assert message.reasoning_content  # type: ignore[attr-defined]
    assert not message.content
    reasoning, content = "", ""
    for chunk in _chat(opened_mesh.base_url, temperature=0, stream=True):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    assert (reasoning, content) == (message.reasoning_content, "")  # type: ignore[attr-defined]


def test_json_output_from_a_reasoning_model_is_content(opened_mesh: Mesh) -> None:
    message = _chat(opened_mesh.base_url, response_format={"type": "json_object"}).choices[0].message
    assert isinstance(json.loads(message.content), dict)
    assert "reasoning_content" not in message.model_dump(exclude_unset=True)
