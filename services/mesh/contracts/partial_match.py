"""Streaming text matchers (stop strings, reasoning tags, tool call tags) hold back an end of
the text that may still grow into what they look for; this measures it once for all of them."""

from __future__ import annotations


def partial_match(text: str, *targets: str) -> int:
    """Length of the longest end of `text` that is a proper start of one of `targets`."""
    best = 0
    for target in targets:
        for size in range(min(len(target) - 1, len(text)), best, -1):
            if text.endswith(target[:size]):
                best = size
                break
    return best
