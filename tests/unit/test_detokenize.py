from __future__ import annotations

import copy
import random

import pytest

from services.inference.detokenize import REPLACEMENT, IncrementalDetokenizer, direct_decoder

TEXTS = [
    "plain ascii text, with punctuation!",
    "héllo wörld — naïve café",
    "中文字符和日本語のテキスト",
    "emoji 🎉🚀 and flags 🇫🇷 mixed in",
    "  leading spaces\n\ttabs\nand newlines  ",
]


def _stream(tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(direct_decoder(tokenizer))  # as the engine makes them
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.finish())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_full_decode_and_never_split_a_character(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any(REPLACEMENT in d for d in deltas)


def test_multibyte_characters_really_span_several_tokens(tokenizer) -> None:
    # Guards the test above: with a 4096-token vocabulary an emoji needs several byte tokens.
    ids = tokenizer("🎉", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    assert tokenizer.decode(ids[:1]).endswith(REPLACEMENT)


def test_random_token_sequences_reproduce_the_full_decode(tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))]
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_produce_no_text(tokenizer) -> None:
    detok = IncrementalDetokenizer(direct_decoder(tokenizer))
    assert detok.add(tokenizer.eos_token_id) == ""


class _Counting:
    """Counts the tokenizer's own decodes, to tell which path the detokenizer took."""

    def __init__(self, tokenizer) -> None:
        self.calls = 0
        self._decode = tokenizer.decode
        tokenizer.decode = self

    def __call__(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        self.calls += 1
        return self._decode(token_ids, skip_special_tokens=skip_special_tokens)


def test_the_rust_tokenizer_decodes_directly_when_transformers_adds_nothing(tokenizer) -> None:
    ids = tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    own = copy.copy(tokenizer)
    counting = _Counting(own)
    assert "".join(_stream(own, ids)) == tokenizer.decode(ids) == TEXTS[1]
    assert counting.calls == 0


def test_a_tokenizer_that_cleans_up_spaces_keeps_its_own_decode(tokenizer) -> None:
    own = copy.copy(tokenizer)
    own.clean_up_tokenization_spaces = True
    counting = _Counting(own)
    ids = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert "".join(_stream(own, ids)) == own.decode(ids)
    assert counting.calls > 0


def test_a_class_with_its_own_decode_keeps_it(tokenizer) -> None:
    class Shouting(type(tokenizer)):  # as model classes that change decoding do
        def decode(self, token_ids: list[int], skip_special_tokens: bool = False, **kwargs: object) -> str:
            return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs).upper()

    own = copy.copy(tokenizer)
    own.__class__ = Shouting
    ids = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert "".join(_stream(own, ids)) == TEXTS[0].upper()
