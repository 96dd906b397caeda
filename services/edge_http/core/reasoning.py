"""Split a reasoning model's output into its reasoning and its answer, as text streams in.

A model whose output opens with a reasoning block (`<think>…</think>` for DeepSeek-R1 and
Qwen3; the tags are per model) has that block sent as `reasoning_content` and only the rest
as `content`; so does one whose chat template opened the block at the end of the prompt, whose
output starts inside it. The tags may arrive split across chunks: text that could still be the start of
a tag is held back until the next chunk decides it.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.edge_http.core.model_versions import ReasoningTags
from services.mesh.contracts.partial_match import partial_match


@dataclass(frozen=True)
class Split:
    reasoning: str = ""
    content: str = ""


class ReasoningSplitter:
    def __init__(self, tags: ReasoningTags, opened: bool = False) -> None:
        """`opened`: the prompt already opened the block, so the output starts inside it."""
        self._open, self._close = tags.open, tags.close
        # start → reasoning → after (the close tag) → answer, or start → answer
        self._state = "reasoning" if opened else "start"
        self._held = ""

    def feed(self, text: str) -> Split:
        self._held += text
        if self._state == "start":
            leading = self._held.lstrip()
            if leading.startswith(self._open):
                self._state, self._held = "reasoning", leading[len(self._open) :]
            elif self._open.startswith(leading):
                return Split()  # whitespace or part of the opening tag so far
            else:
                self._state = "answer"
        if self._state == "reasoning":
            end = self._held.find(self._close)
            if end >= 0:
                reasoning, self._held = self._held[:end], self._held[end + len(self._close) :]
                self._state = "after"
                return Split(reasoning=reasoning, content=self._answer())
            keep = partial_match(self._held, self._close)
            reasoning, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
            return Split(reasoning=reasoning)
        return Split(content=self._answer())

    def _answer(self) -> str:
        if self._state == "after":  # the blank lines between the block and the answer are no answer
            self._held = self._held.lstrip()
            if not self._held:
                return ""
            self._state = "answer"
        return self._take_all()

    def finish(self) -> Split:
        """What is still held when the output ends (an unfinished tag is just text)."""
        held, self._held = self._held, ""
        if self._state == "after":
            return Split()  # only blank lines followed the block
        return Split(reasoning=held) if self._state == "reasoning" else Split(content=held)

    def _take_all(self) -> str:
        text, self._held = self._held, ""
        return text
