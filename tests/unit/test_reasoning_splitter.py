"""The reasoning splitter: tags anywhere in the chunking, whitespace, no reasoning block."""

from __future__ import annotations

import pytest

from services.edge_http.core.model_versions import ReasoningTags
from services.edge_http.core.reasoning import ReasoningSplitter

TAGS = ReasoningTags("<think>", "</think>")
OUTPUT = "<think>Let me see: 2+2.\nIt is 4.</think>\n\nThe answer is 4."


def _run(chunks: list[str], opened: bool = False) -> tuple[str, str]:
    splitter = ReasoningSplitter(TAGS, opened)
    reasoning = content = ""
    for chunk in chunks:
        part = splitter.feed(chunk)
        reasoning, content = reasoning + part.reasoning, content + part.content
    tail = splitter.finish()
    return reasoning + tail.reasoning, content + tail.content


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 100])
def test_any_chunking_gives_the_same_split(size: int) -> None:
    chunks = [OUTPUT[i : i + size] for i in range(0, len(OUTPUT), size)]
    assert _run(chunks) == ("Let me see: 2+2.\nIt is 4.", "The answer is 4.")


def test_output_without_a_reasoning_block_is_all_content() -> None:
    assert _run(["The ", "answer", " is <b>4</b>."]) == ("", "The answer is <b>4</b>.")
    assert _run(["<thi", "s is not a tag"]) == ("", "<this is not a tag")


def test_leading_whitespace_before_the_block_is_dropped() -> None:
    assert _run(["\n ", "<think>", "x", "</think>", "y"]) == ("x", "y")


def test_an_unfinished_block_stays_reasoning_and_partial_tags_are_released_at_the_end() -> None:
    assert _run(["<think>still thinking </th"]) == ("still thinking </th", "")


def test_reasoning_reaches_the_caller_before_the_block_closes() -> None:
    splitter = ReasoningSplitter(TAGS)
    assert splitter.feed("<think>step one").reasoning == "step one"
    assert splitter.feed(" and two</").reasoning == " and two"  # "</" could start the closing tag
    assert splitter.feed("think>done").content == "done"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
def test_a_block_the_prompt_opened_is_reasoning_from_the_first_character(size: int) -> None:
    # DeepSeek-R1's template ends the prompt with `<think>\n`: the output starts inside the block.
    output = OUTPUT.removeprefix("<think>")
    chunks = [output[i : i + size] for i in range(0, len(output), size)]
    assert _run(chunks, opened=True) == ("Let me see: 2+2.\nIt is 4.", "The answer is 4.")
    assert _run(chunks, opened=False) == ("", output)  # not opened: all of it is the answer
    assert _run(["no close tag yet"], opened=True) == ("no close tag yet", "")
