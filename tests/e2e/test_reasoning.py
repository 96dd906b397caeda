"""Reasoning output reaches clients as `reasoning_content`, apart from the answer.

The default model's gibberish never opens a reasoning block, so a scripted inference service
(a test fixture: real gRPC over the mesh's mTLS, announcing `<think>` tags as a reasoning
model's instance does) streams one, with the tags split across chunks, to a real edge and
preprocess. The real default model is then checked to answer well-formed without the field,
and behind a DeepSeek-R1-style template (which opens `<think>` at the end of the prompt) to
answer with its whole output as reasoning, never as content.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from meshproc import Edge, Mesh, start_mesh
from scripted_inference import ScriptedModel, scripted_edge

from services.inference.manifest import write_manifest
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
        model="sluice-tiny", messages=[{"role": "user", "content": "2+2?"}], max_tokens=16,
        extra_headers={"Cache-Control": "no-cache"}, **extra,
    )  # fmt: skip


def test_streamed_reasoning_arrives_as_reasoning_content_never_as_content(reasoning_edge: Edge) -> None:
    reasoning, content = "", ""
    for chunk in _chat(reasoning_edge.base_url, stream=True):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    assert reasoning == "Two plus two is four."
    assert content == "It is 4."


def test_whole_response_carries_message_reasoning_content(reasoning_edge: Edge) -> None:
    message = _chat(reasoning_edge.base_url).choices[0].message
    assert message.content == "It is 4."
    assert message.reasoning_content == "Two plus two is four."  # type: ignore[attr-defined]


def test_a_model_without_reasoning_tags_answers_without_the_field(mesh: Mesh) -> None:
    reply = _chat(mesh.base_url, temperature=0)
    assert reply.choices[0].message.content
    assert "reasoning_content" not in reply.choices[0].message.model_dump(exclude_unset=True)


@pytest.fixture(scope="module")
def opened_mesh(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path, model_dir: Path) -> Iterator[Mesh]:
    """The real default model with a template that ends the prompt inside `<think>`, as R1's does."""
    model = tmp_path_factory.mktemp("r1-style") / model_dir.name
    shutil.copytree(model_dir, model)
    template = model / "chat_template.jinja"
    generation_prompt = "'<|im_start|>assistant\\n' }}{%- endif %}"
    assert template.read_text().endswith(generation_prompt)
    template.write_text(
        template.read_text().replace(generation_prompt, "'<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
    )
    write_manifest(model)
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
