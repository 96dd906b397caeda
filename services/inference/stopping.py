"""Stop strings: cut the output before the first stop string and never emit any part of it.

Text that could be the beginning of a stop string is held back until the next delta
proves it is not, so a stop string split across tokens is still caught.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.mesh.contracts.partial_match import partial_match


@dataclass
class StopResult:
    text: str  # safe to emit now
    stopped: bool


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, delta: str) -> StopResult:
        if not self._stops:
            return StopResult(delta, False)
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return StopResult(text[: min(hits)], True)
        keep = partial_match(text, *self._stops)
        self._held = text[len(text) - keep :] if keep else ""
        return StopResult(text[: len(text) - keep], False)

    def flush(self) -> str:
        """Release held text when generation ends for another reason."""
        held, self._held = self._held, ""
        return held
