"""Bounds on client JSON: depth measured on the text without parsing, surrogates and depth found
in a parsed document without recursion, each named by its path."""

from __future__ import annotations

import json

import pytest

from services.mesh.contracts.errors import InvalidArgument
from services.mesh.contracts.json_limits import MAX_DEPTH, depth_problem, loads_bounded, text_problem


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("[" * MAX_DEPTH + "]" * MAX_DEPTH, None),
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "[0][0][0][0]"),
        ("[" * 1_000_000, "[0][0][0][0]"),  # unbalanced: found at level 65, the rest never read
        ('["' + "[" * 500 + '"]', None),  # brackets inside a string do not nest
        ('{"a": "\\"' + "[" * 500 + '"}', None),  # nor after an escaped quote
        ('{"a": "\\\\", "b": ' + "[" * 70 + "]" * 70 + "}", "b[0][0][0]"),  # an escaped backslash ends it
        ('{"a": [' + "{}, " * 5000 + "{}]}", None),  # many brackets, all shallow
        ('{"x": 1, "tools": [{}, {"function": {"par\u0061meters": ' + "[" * 70, "tools[1].function.parameters"),
    ],
)
def test_depth_is_measured_on_the_text_and_named_by_where_it_starts(text: str, path: str | None) -> None:
    problem = depth_problem(text)
    assert (problem.path if problem else None) == path
    assert problem is None or problem.reason == "nests deeper than 64 levels"


def test_unpaired_surrogates_are_found_and_named_by_path() -> None:
    assert text_problem({"stop": ["fine", "a\ud800b"]}).path == "stop[1]"
    assert text_problem({"messages": [{"content": "x", "name": "\udfff"}]}).path == "messages[0].name"
    assert text_problem({"metadata": {"k\udc00": 1}}).path == "metadata"  # keys too
    assert text_problem({"messages": [{"content": "emoji \U0001f600 and ünïcode"}], "n": 1}) is None


def test_loads_bounded_names_the_field() -> None:
    assert loads_bounded('{"type": "object"}', "tools") == {"type": "object"}
    for text, needle in [
        ("[" * 5000 + "]" * 5000, "tools[0][0][0][0]: nests deeper than 64 levels"),
        ("{not json", "tools: not valid JSON"),
        (json.dumps([{"description": "a\ud800"}]), "tools[0].description: contains an unpaired"),
    ]:
        with pytest.raises(InvalidArgument) as refused:
            loads_bounded(text, "tools")
        assert needle in refused.value.message and refused.value.param == "tools"
