"""Structured output: JSON-schema-constrained decoding with llguidance, closed within max_tokens.

Each step masks the logits to the tokens the grammar allows, so every sampled token keeps the
output a valid JSON prefix. That alone still leaves JSON cut off when max_tokens runs out (a
small model happily writes a string forever), so a constrained sequence also keeps the
*closure* of its current state: the tokens a fixed, model-free policy needs to finish the JSON
(close the string, the open arrays and objects, fill required keys) and end it. Once the
model's next token would leave less budget than its closure needs, the sequence emits the
closure instead. The output is then valid JSON whenever max_tokens is at least the closure of
the empty state, which admission checks.
"""

from __future__ import annotations

from collections.abc import Callable

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from services.mesh.contracts.errors import InvalidArgument
from services.mesh.contracts.json_limits import loads_bounded

# A schema whose shortest finish the closing policy cannot find within this many tokens is refused.
_MAX_CLOSURE = 1024
# Closures are recomputed at every step while the budget left is within this many tokens of the
# last closure's length, and every _REFRESH_EVERY steps before that: one token can add several
# closing tokens (`[{"` opens three things, a key can start a required object), but between two
# refreshes they rarely add up to this many; if they do, the closure may no longer fit.
_SLACK = 16
_REFRESH_EVERY = 8
# The closing policy's preference, lower first: end the sequence; end a string (a token of only
# `"]}` that starts with `"`; inside a string `]` is just text); close arrays and objects; end a
# number or value with `,` (towards the required keys left); a short JSON atom; anything else,
# longest first; whitespace last.
_CLOSERS = frozenset(b'"]}')
_ATOMS = frozenset({b"0", b"null", b"false", b"true", b":", b"[]", b"{}"})


class JsonGrammars:
    """Per model: the llguidance tokenizer and the closing policy's token preferences."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids))
        self.vocab_size = vocab_size
        self._preference = _closing_preference(self._tokenizer.decode_bytes, vocab_size, eos_ids)

    def matcher(self, schema: str) -> JsonMatcher:
        """A fresh matcher for one sequence; a schema the compiler refuses is the caller's error."""
        document = loads_bounded(schema, "response_format")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(document, defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as err:
            raise InvalidArgument(f"response_format: not a JSON schema: {err}", "response_format") from err
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidArgument(f"response_format: unsupported schema: {matcher.get_error()}", "response_format")
        return JsonMatcher(matcher, self._preference)


class JsonMatcher:
    """One sequence's grammar state, its mask and its closure."""

    def __init__(self, matcher: llguidance.LLMatcher, preference: np.ndarray) -> None:
        self._matcher = matcher
        self._preference = preference
        closure = _close(matcher.deep_copy(), preference, limit=_MAX_CLOSURE)
        if closure is None:
            raise InvalidArgument(
                f"response_format: no way found to finish JSON for this schema within {_MAX_CLOSURE} tokens",
                "response_format",
            )
        # The closure, fresh when computed from the current state; None when the policy finds none
        # within budget (the JSON may then be cut at max_tokens, finish_reason "length").
        self._closure: list[int] | None = closure
        self._fresh, self._stale_steps = True, 0
        self._forced: list[int] = []

    @property
    def closure_length(self) -> int:
        return len(self._closure or ())

    @property
    def finished(self) -> bool:
        """The JSON is complete: nothing but the end of the sequence may follow."""
        return self._matcher.is_stopped()

    def next_token(self, sample: Callable[[torch.Tensor], int], logits: torch.Tensor, remaining: int) -> int:
        """The token to emit with `remaining` tokens of budget left (this one included): the model's
        choice among the allowed tokens while the budget allows, else the next closing token."""
        if not self._forced:
            near = remaining - 1 <= self.closure_length + _SLACK
            if not self._fresh and (near or self._stale_steps >= _REFRESH_EVERY):
                self._closure = _close(self._matcher.deep_copy(), self._preference, min(remaining, _MAX_CLOSURE))
                self._fresh, self._stale_steps = True, 0
                near = remaining - 1 <= self.closure_length + _SLACK
            # Masks are built on the CPU (numpy: this also runs once per closing step, where torch's
            # per-op cost shows).
            allowed = torch.from_numpy(_allowed(self._matcher, logits.numel())).to(logits.device)
            token = sample(logits.masked_fill(~allowed, float("-inf")))
            self._accept(token)
            if not near or self._closure is None:
                self._fresh, self._stale_steps = False, self._stale_steps + 1
                return token
            if self._closure and token == self._closure[0]:
                after: list[int] | None = self._closure[1:]  # the model took the closure's own next step
            else:
                after = _close(self._matcher.deep_copy(), self._preference, limit=remaining - 1)
            if after is not None:
                self._closure = after
                return token
            # The model's token would not leave room to finish: emit the closure from before it.
            self._matcher.rollback(1)
            self._forced = list(reversed(self._closure))
        token = self._forced.pop()
        self._accept(token)
        return token

    def _accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"grammar refused token {token}: {self._matcher.get_error()}")


def _allowed(matcher: llguidance.LLMatcher, vocab_size: int) -> np.ndarray:
    return np.frombuffer(matcher.compute_logit_bias(), dtype=np.uint8)[:vocab_size] != 0


def _close(matcher: llguidance.LLMatcher, preference: np.ndarray, limit: int | None) -> list[int] | None:
    """The closing policy's tokens from this state to the end, or None past `limit` tokens."""
    tokens: list[int] = []
    while limit is None or len(tokens) < limit:
        allowed = _allowed(matcher, preference.size)
        token = int(np.where(allowed, preference, np.inf).argmin())
        if not allowed[token] or not matcher.consume_token(token):
            raise RuntimeError(f"no way to finish the JSON: {matcher.get_error()}")
        tokens.append(token)
        if matcher.is_stopped():
            return tokens
    return None


def _closing_preference(decode: Callable[[list[int]], bytes], vocab_size: int, eos: frozenset[int]) -> np.ndarray:
    """Per token, the closing policy's rank (lower is chosen first; ties go to the lower id)."""
    ranks = np.empty(vocab_size, dtype=np.float64)
    for token in range(vocab_size):
        text = decode([token])
        if token in eos:
            rank = 0.0
        elif text.startswith(b'"') and set(text) <= _CLOSERS:
            rank = 1.0 - len(text) / 1e3  # `"}` ends a string and an object at once
        elif text and set(text) <= _CLOSERS:
            rank = 2.0 - len(text) / 1e3
        elif text == b",":
            rank = 3.0
        elif text in _ATOMS:
            rank = 4.0
        elif text.strip():
            rank = 5.0 - min(len(text), 999) / 1e3  # forced spellings (required keys) in fewest tokens
        else:
            rank = 6.0  # whitespace and empty tokens make no progress
        ranks[token] = rank
    return ranks
