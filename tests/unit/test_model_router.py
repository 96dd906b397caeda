"""Routing between models and versions, without a network."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from services.edge_http.core.model_versions import ModelRouter, Served, UnknownModel, UnknownVersion, parse_weights


def _served(version: str, healthy: bool = True, model: str = "m", kind: str = "chat") -> Served:
    return Served(model, version, kind, 2048, 0, healthy)


def test_weights_parse_and_reject_what_they_cannot_mean() -> None:
    assert parse_weights("m@1=90, m@2=10,x@a=0") == {"m": {"1": 90.0, "2": 10.0}, "x": {"a": 0.0}}
    for bad in ("m=90", "m@1", "m@1=lots", "m@1=-1", "@1=3"):
        with pytest.raises(ValueError, match="model_weights"):
            parse_weights(bad)


def test_draws_follow_the_weights_among_healthy_versions() -> None:
    router = ModelRouter("m@1=75,m@2=25", rng=random.Random(7))
    served = [_served("1"), _served("2"), _served("2")]
    counts = Counter(router.choose("m", served).version for _ in range(4000))
    assert 2800 < counts["1"] < 3200 and counts["1"] + counts["2"] == 4000


def test_an_unhealthy_version_gets_nothing_and_unweighted_ones_step_in_when_needed() -> None:
    router = ModelRouter("m@1=100", rng=random.Random(1))
    assert {router.choose("m", [_served("1", healthy=False), _served("2")]).version for _ in range(50)} == {"2"}
    # Without weights, healthy versions share equally.
    equal = ModelRouter(rng=random.Random(2))
    shares = Counter(equal.choose("m", [_served("1"), _served("2")]).version for _ in range(2000))
    assert 850 < shares["1"] < 1150


def test_the_pin_wins_and_unknown_names_are_errors() -> None:
    router = ModelRouter("m@1=100", aliases="fancy=m")
    assert router.choose("m", [_served("1"), _served("2")], pinned="2").version == "2"
    with pytest.raises(UnknownVersion, match="no version '9'"):
        router.choose("m", [_served("1")], pinned="9")
    with pytest.raises(UnknownModel):
        router.choose("other", [_served("1")])
    assert router.resolve("fancy") == "m" and router.resolve("m") == "m"
    with pytest.raises(ValueError, match="model_aliases"):
        ModelRouter(aliases="no-equals-sign")
