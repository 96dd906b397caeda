"""Output processing: one sequence's tokens → the text its reader gets. Tokens are detokenized
incrementally (never splitting a character), the text is cut before the first stop string, and
the sequence finishes on EOS, on a closed grammar (structured output) or at max_tokens."""

from __future__ import annotations

from services.inference.detokenize import Decoder, IncrementalDetokenizer
from services.inference.engine_api import GenerationRequest
from services.inference.stopping import StopMatcher
from services.inference.structured import JsonMatcher


class SequenceOutput:
    def __init__(
        self, request: GenerationRequest, decoder: Decoder, eos_ids: frozenset[int], grammar: JsonMatcher | None
    ) -> None:
        self._request = request
        self._detok = IncrementalDetokenizer(decoder)
        self._stopper = StopMatcher(list(request.stop))
        self._eos_ids = eos_ids
        self._grammar = grammar

    def add(self, token: int, generated: int) -> tuple[str, str | None]:
        """The text `token` releases, and the finish reason if it ends the sequence (`generated`:
        tokens produced so far, this one included)."""
        grammar = self._grammar
        # Structured output ends with its JSON, whatever ignore_eos says.
        eos = token in self._eos_ids and (grammar is not None or not self._request.sampling.ignore_eos)
        result = self._stopper.feed("" if eos else self._detok.add(token))
        if result.stopped or eos or (grammar is not None and grammar.finished):
            finish: str | None = "stop"
        else:
            finish = "length" if generated == self._request.max_tokens else None
        text = result.text
        if finish and not result.stopped:
            # Generation ended on its own: release what the detokenizer and stop matcher held.
            tail = self._stopper.feed(self._detok.finish())
            text += tail.text + ("" if tail.stopped else self._stopper.flush())
            finish = "stop" if tail.stopped else finish
        return text, finish
