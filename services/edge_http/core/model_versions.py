"""Which model and version serves a request: aliases, canary weights, pinning by header.

Each inference instance says what it serves (ListModels: id, version, kind); the edge keeps
that per instance. A request names a model id or an alias of one; among the versions of that
id that have a healthy instance, the configured weights decide (e.g. 90/10 for a canary), and
a caller may pin one (context.py: VERSION_HEADER). A version without a healthy instance gets no
traffic; with no weights configured, the healthy versions share it equally.
Pure logic: the instances' state is passed in.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from services.mesh.config import comma_list
from services.mesh.contracts.tool_formats import ToolFormat


@dataclass(frozen=True)
class ReasoningTags:
    """The tags around the reasoning block a model's output opens with (`<think>`, `</think>`)."""

    open: str
    close: str


@dataclass(frozen=True)
class Served:
    """What one inference instance serves, and whether it is healthy now."""

    id: str
    version: str
    kind: str  # chat or embedding
    context_length: int
    created: int
    healthy: bool
    reasoning: ReasoningTags | None = None  # the tags around the block its output opens with
    tool_format: ToolFormat | None = None  # how its output carries tool calls (None: no tools)


class UnknownModel(LookupError):
    pass


class UnknownVersion(LookupError):
    pass


def parse_pairs(text: str, what: str) -> dict[str, str]:
    """`a=b,c=d` → {a: b, c: d}; a clear error for anything else."""
    pairs = {}
    for item in comma_list(text):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{what}: {item!r} is not NAME=VALUE")
        pairs[key.strip()] = value.strip()
    return pairs


def parse_weights(text: str) -> dict[str, dict[str, float]]:
    """`model@1=90,model@2=10` → {model: {1: 90, 2: 10}}."""
    weights: dict[str, dict[str, float]] = {}
    for target, weight in parse_pairs(text, "model_weights").items():
        model, sep, version = target.rpartition("@")
        if not sep or not model or not version:
            raise ValueError(f"model_weights: {target!r} is not MODEL@VERSION")
        try:
            share = float(weight)
        except ValueError:
            raise ValueError(f"model_weights: {weight!r} is not a number") from None
        if share < 0:
            raise ValueError(f"model_weights: {target} has a negative weight")
        weights.setdefault(model, {})[version] = share
    return weights


class ModelRouter:
    def __init__(self, weights: str = "", aliases: str = "", rng: random.Random | None = None) -> None:
        self._weights = parse_weights(weights)
        self._aliases = parse_pairs(aliases, "model_aliases")
        self._rng = rng or random.Random()

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def resolve(self, name: str) -> str:
        return self._aliases.get(name, name)

    def choose(self, model_id: str, served: Iterable[Served], pinned: str | None = None) -> Served:
        """The version to use: pinned if asked, else drawn by weight among the healthy ones."""
        candidates = [s for s in served if s.id == model_id]
        if not candidates:
            raise UnknownModel(model_id)
        by_version: dict[str, Served] = {}
        for entry in sorted(candidates, key=lambda s: not s.healthy):  # a healthy entry describes its version
            by_version.setdefault(entry.version, entry)
        if pinned is not None:
            if pinned not in by_version:
                raise UnknownVersion(f"{model_id} has no version {pinned!r} (it has {', '.join(sorted(by_version))})")
            return by_version[pinned]
        healthy = [v for v, s in by_version.items() if s.healthy] or list(by_version)  # none healthy: let it fail
        configured = self._weights.get(model_id, {})
        shares = [configured.get(v, 0.0) if configured else 1.0 for v in healthy]
        if not any(shares):  # every weighted version is down: the others still serve
            shares = [1.0] * len(healthy)
        return by_version[self._rng.choices(healthy, weights=shares)[0]]
