"""The JSON constraint and its closing policy, driven token by token without the model: whatever
an adversarial "model" prefers, the output is valid JSON for the schema within the budget."""

from __future__ import annotations

import json

import jsonschema
import llguidance
import llguidance.hf
import pytest
import torch

from services.inference.structured import JsonGrammars, JsonMatcher, _closing_preference
from services.mesh.contracts.errors import InvalidArgument

SCHEMAS = {
    "object": {"type": "object"},
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            "kind": {"enum": ["cat", "dog"]},
        },
        "required": ["name", "age", "tags", "address", "kind"],
        "additionalProperties": False,
    },
    "numbers": {"type": "array", "items": {"type": "number"}, "minItems": 2},
}


@pytest.fixture(scope="module")
def grammars(tokenizer) -> JsonGrammars:
    return JsonGrammars(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """The llguidance tokenizer JsonGrammars builds for the same model, to read token bytes with."""
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=[tokenizer.eos_token_id])


@pytest.fixture(scope="module")
def closing_preference(tokenizer, ll_tokenizer: llguidance.LLTokenizer) -> torch.Tensor:
    """Per token, the closing policy's rank (higher is liked less), as JsonGrammars computes it."""
    eos_ids = frozenset({tokenizer.eos_token_id})
    return torch.from_numpy(_closing_preference(ll_tokenizer.decode_bytes, len(tokenizer), eos_ids)).float()


def _decode(ll_tokenizer: llguidance.LLTokenizer, tokens: list[int]) -> str:
    return ll_tokenizer.decode_bytes(tokens).decode()


def _generate(grammars: JsonGrammars, matcher: JsonMatcher, budget: int, logits_for) -> list[int]:
    tokens: list[int] = []
    while len(tokens) < budget and not matcher.finished:
        token = matcher.next_token(lambda masked: int(masked.argmax()), logits_for(len(tokens)), budget - len(tokens))
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_an_adversary_that_never_wants_to_close_still_gets_valid_json_in_budget(
    grammars: JsonGrammars, ll_tokenizer: llguidance.LLTokenizer, closing_preference: torch.Tensor, name: str
) -> None:
    schema = SCHEMAS[name]
    shortest = grammars.matcher(json.dumps(schema)).closure_length
    # The "model" always prefers what the closing policy likes least: long text, digits, spaces.
    stubborn = closing_preference
    noise = torch.Generator().manual_seed(7)
    for budget in range(shortest, shortest + 48, 3):
        for logits_for in (lambda _: stubborn, lambda _: torch.randn(grammars.vocab_size, generator=noise) * 5):
            tokens = _generate(grammars, grammars.matcher(json.dumps(schema)), budget, logits_for)
            assert len(tokens) <= budget
            jsonschema.validate(json.loads(_decode(ll_tokenizer, tokens)), schema)


def test_an_adversary_that_nests_deeply_long_before_the_budget_ends_is_still_closed(
    grammars: JsonGrammars, ll_tokenizer: llguidance.LLTokenizer
) -> None:
    def only_opens(token: int) -> bool:
        text = ll_tokenizer.decode_bytes([token])
        return bool(text) and set(text) <= set(b"[{")

    # Opening brackets are what grows a closure: the closure must be kept fresh far from the end too.
    openers = torch.tensor([10.0 if only_opens(t) else 0.0 for t in range(grammars.vocab_size)])
    for schema in ({"type": "array"}, {"type": "object"}):
        for budget in (60, 120, 200):
            tokens = _generate(grammars, grammars.matcher(json.dumps(schema)), budget, lambda _: openers)
            assert len(tokens) <= budget
            value = json.loads(_decode(ll_tokenizer, tokens))
            jsonschema.validate(value, schema)
            assert _decode(ll_tokenizer, tokens).count("[") > 10  # it did nest deeply before closing


def test_json_object_closes_in_two_tokens_and_required_keys_take_more(
    grammars: JsonGrammars,
) -> None:
    assert grammars.matcher('{"type":"object"}').closure_length <= 2
    person = grammars.matcher(json.dumps(SCHEMAS["person"]))
    # {"name":"","age":0,"tags":[""],"address":{"city":""},"kind":"cat"} cannot take few tokens.
    assert person.closure_length > 10


@pytest.mark.parametrize("schema", ['{"type": "no-such-type"}', "not json", "[1, 2]"])
def test_schemas_the_compiler_refuses_are_invalid_arguments(grammars: JsonGrammars, schema: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        grammars.matcher(schema)
    assert err.value.param == "response_format"
