"""One run's generated text → the output events of its choice.

A chat's text passes through the model's reasoning splitter (reasoning models) and tool call
parser (requests with tools) before it becomes answer text, reasoning text or tool calls; a text
completion's is the answer as it is, after its echoed prompt when asked for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.edge_http.core.events import Delta, Echo, Finish, OutputEvent, WholeChoice
from services.edge_http.core.model_versions import ReasoningTags
from services.edge_http.core.reasoning import ReasoningSplitter
from services.edge_http.core.runs import Run
from services.edge_http.core.tools import ToolCall, ToolMode, make_parser


@dataclass(frozen=True)
class OutputRules:
    """How a chat's output is read: whether it may open with a reasoning block (and whether the
    prompt opened it already), and how it carries tool calls when tools are offered."""

    reasoning: ReasoningTags | None = None
    reasoning_opened: bool = False  # the prompt opened the block: the output starts inside it
    tools: ToolMode | None = None


@dataclass
class Shaped:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class OutputShaper:
    """Generated text → reasoning, content and tool calls, piece by piece."""

    def __init__(self, rules: OutputRules) -> None:
        self._splitter = ReasoningSplitter(rules.reasoning, rules.reasoning_opened) if rules.reasoning else None
        self._parser = make_parser(rules.tools.format) if rules.tools else None
        self.calls_made = 0
        if self._parser is not None and rules.tools is not None and rules.tools.forced_start:
            self._parser.feed(rules.tools.forced_start)  # the forced start of the call is part of the output

    def feed(self, text: str, final: bool = False) -> Shaped:
        out = Shaped()
        parts = [self._splitter.feed(text), *([self._splitter.finish()] if final else [])] if self._splitter else []
        answer = "".join(p.content for p in parts) if self._splitter else text
        out.reasoning = "".join(p.reasoning for p in parts)
        if self._parser is None:
            out.content = answer
            return out
        for parsed in (self._parser.feed(answer), *([self._parser.finish()] if final else [])):
            out.content += parsed.content
            out.calls += parsed.calls
        self.calls_made += len(out.calls)
        return out

    def finish_reason(self, reason: str | None) -> str:
        return "tool_calls" if self.calls_made else (reason or "stop")


async def choice_events(
    run: Run, choice: int, rules: OutputRules | None, echo: bool = False
) -> AsyncIterator[OutputEvent]:
    """The choice's events as the run produces them (`rules` None: the text as it is)."""
    if echo:
        yield Echo(choice, run.prompt.prompt_text, run.first.prompt_logprobs)
    shaper = OutputShaper(rules or OutputRules())
    async for event in run.events():
        calls_before = shaper.calls_made
        shaped = shaper.feed(event.text, final=bool(event.finish_reason))
        if shaped.content or shaped.reasoning or shaped.calls or event.logprobs:
            yield Delta(choice, shaped.content, shaped.reasoning, tuple(shaped.calls), calls_before, event.logprobs)
        if event.finish_reason:
            yield Finish(choice, shaper.finish_reason(event.finish_reason), event.usage)


async def whole_choice(run: Run, choice: int, rules: OutputRules | None, echo: bool = False) -> WholeChoice:
    """The choice's output once the run has finished, shaped at once."""
    text, last, logprobs = await run.collect()
    shaper = OutputShaper(rules or OutputRules())
    shaped = shaper.feed(text, final=True)
    output = Delta(choice, shaped.content, shaped.reasoning, tuple(shaped.calls), 0, tuple(logprobs))
    finish = Finish(choice, shaper.finish_reason(last.finish_reason), last.usage)
    echoed = Echo(choice, run.prompt.prompt_text, run.first.prompt_logprobs) if echo else None
    return WholeChoice(output, finish, echoed)
