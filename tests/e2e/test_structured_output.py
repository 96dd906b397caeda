"""response_format on the real mesh and the real default model, driven by the openai SDK: the
gibberish model's output is still always JSON, matching the schema, within max_tokens."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from meshproc import Mesh
from pydantic import BaseModel

MODEL = "sluice-tiny"
NO_CACHE = {"Cache-Control": "no-cache"}
MESSAGES = [{"role": "user", "content": "Describe a cat as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}


class Pet(BaseModel):
    name: str
    legs: int
    vaccinated: bool


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.base_url, api_key="unused", max_retries=0, timeout=120)


def _json_object(client: openai.OpenAI, seed: int) -> tuple[str, str | None]:
    """One sampled json_object request; every third one streamed. Returns (text, finish_reason)."""
    # Budgets from 8 to 71 tokens: most run out mid-JSON, which is what the closing is for.
    kwargs = dict(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=8 + seed * 9 % 64,
        temperature=1.0,
        seed=seed,
        response_format={"type": "json_object"},
        extra_headers=NO_CACHE,
    )
    if seed % 3:
        reply = client.chat.completions.create(**kwargs)
        return reply.choices[0].message.content or "", reply.choices[0].finish_reason
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices)


def test_fifty_json_object_requests_all_return_parseable_json(client: openai.OpenAI) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda seed: _json_object(client, seed), range(50)))
    for text, finish in results:
        assert isinstance(json.loads(text), dict), text
        assert finish == "stop"
    # Sampling differs per seed: not fifty copies of the shortest object.
    assert len({text for text, _ in results}) > 10


def test_json_schema_output_validates_against_the_schema(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(10):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=40 + seed * 7,
            temperature=1.0,
            seed=seed,
            response_format=fmt,
            extra_headers=NO_CACHE,
        )
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
        assert reply.usage.completion_tokens <= 40 + seed * 7


def test_the_sdk_parses_the_reply_into_a_pydantic_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.parse(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=30,
        temperature=0.8,
        seed=3,
        response_format=Pet,
        extra_headers=NO_CACHE,
    )
    pet = reply.choices[0].message.parsed
    assert isinstance(pet, Pet)
    assert Pet.model_validate_json(reply.choices[0].message.content) == pet


def test_unsupported_combinations_and_impossible_budgets_are_clear_400s(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    with pytest.raises(openai.BadRequestError, match="max_tokens 3 is too small") as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, response_format=fmt)
    assert err.value.body["param"] == "max_tokens"
    broken = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError, match="response_format") as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, response_format=broken)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="cannot be combined with tools"):
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=[tool], response_format={"type": "json_object"}
        )
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "json_schema"})
