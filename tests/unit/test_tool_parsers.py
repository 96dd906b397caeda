"""Tool call parsers: every chunking of an output gives the same calls and content."""

from __future__ import annotations

import json

import pytest

from services.edge_http.core.tools import Parsed, forced_prefix, make_parser

HERMES_OUTPUT = (
    'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}</tool_call>'
)


def _run(kind: str, output: str, size: int, prefix: str = "") -> Parsed:
    parser, out = make_parser(kind), Parsed()
    out += parser.feed(prefix)
    for i in range(0, len(output), size):
        out += parser.feed(output[i : i + size])
    out += parser.finish()
    return out


def _calls(parsed: Parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_hermes_calls_and_content_under_any_chunking(size: int) -> None:
    parsed = _run("hermes", HERMES_OUTPUT, size)
    assert parsed.content == "Let me check."
    assert _calls(parsed) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert len({c.id for c in parsed.calls}) == 2 and all(c.id.startswith("call_") for c in parsed.calls)


def test_hermes_leaves_malformed_blocks_and_plain_text_alone() -> None:
    assert _run("hermes", "a <tool_call>not json</tool_call> b", 4).content == "a <tool_call>not json</tool_call> b"
    assert _run("hermes", "<tool_", 2).content == "<tool_"
    assert _calls(_run("hermes", '<tool_call>{"name": "f", "arguments": {}}', 5)) == [("f", {})]  # unclosed at EOS


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_json_object_or_list_is_a_call_anything_else_content(size: int) -> None:
    assert _calls(_run("json", ' {"name": "f", "parameters": {"x": 1}}', size)) == [("f", {"x": 1})]
    two_calls = '[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]'
    assert _calls(_run("json", two_calls, size)) == [("f", {}), ("g", {})]
    assert _run("json", '{"answer": 42}', size).content == '{"answer": 42}'
    assert _run("json", "Hello there", size) == Parsed(content="Hello there")


@pytest.mark.parametrize("kind", ["hermes", "json"])
def test_a_forced_call_reads_whole_with_its_prefix(kind: str) -> None:
    rest = '{"city": "Oslo"}}' + ("\n</tool_call>" if kind == "hermes" else "")
    assert _calls(_run(kind, rest, 3, forced_prefix(kind, "get_weather"))) == [("get_weather", {"city": "Oslo"})]
    named_by_model = 'get_weather", "arguments": {}}' if kind == "json" else '{"name": "get_weather", "arguments": {}}'
    tail = "" if kind == "json" else "</tool_call>"
    assert _calls(_run(kind, named_by_model + tail, 2, forced_prefix(kind, None))) == [("get_weather", {})]
