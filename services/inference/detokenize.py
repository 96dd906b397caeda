"""Incremental detokenization: text deltas that never split a UTF-8 character.

Decoding each new token alone breaks multi-byte characters and tokenizers that merge
spaces across tokens, so each step decodes a short window of recent tokens and emits only
what the window added. Text ending in U+FFFD (an incomplete byte sequence) is held back
until the next token completes it. `finish` flushes the rest so that the concatenated
deltas equal a full decode of every token.
"""

from __future__ import annotations

from typing import Protocol

from transformers import PreTrainedTokenizerFast

REPLACEMENT = "\ufffd"
# Tokens of context kept before the unread ones; enough for any merge a decoder makes.
_WINDOW = 6


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def direct_decoder(tokenizer: Decoder) -> Decoder:
    """What to decode with (chosen once per model): the Rust tokenizer behind a transformers fast
    tokenizer when transformers' decode would return exactly its text, that is when the class
    decodes as transformers' own fast tokenizer does (some model classes change `decode`) and
    cleans up no spaces; else the tokenizer itself. transformers' wrapper converts the id list
    element by element first, three quarters of what a decode cost here."""
    kind = type(tokenizer)
    plain = isinstance(tokenizer, PreTrainedTokenizerFast) and all(
        getattr(kind, name) is getattr(PreTrainedTokenizerFast, name) for name in ("decode", "_decode")
    )
    if not plain or tokenizer.clean_up_tokenization_spaces:
        return tokenizer
    return tokenizer.backend_tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # tokens before this are already emitted as text
        self.emitted = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        window = self._decode(self.token_ids[self._prefix_offset :])
        if window.endswith(REPLACEMENT) or len(window) <= len(prefix):
            return ""
        delta = window[len(prefix) :]
        self._read_offset = len(self.token_ids)
        self._prefix_offset = max(0, self._read_offset - _WINDOW)
        self.emitted += delta
        return delta

    def finish(self) -> str:
        """The remaining text, so that everything emitted equals the full decode."""
        full = self._decode(self.token_ids)
        rest = full[len(self.emitted) :] if full.startswith(self.emitted) else ""
        self.emitted += rest
        return rest
