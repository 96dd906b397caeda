"""What the core gives for a generation, whichever front end renders it. Streamed: per choice,
pieces of output as they come, then how the choice finished; last, the request's usage. Events
of several choices interleave as the choices progress; each names its choice (numbered as OpenAI
numbers them: prompt by prompt, `n` each). Whole: each choice's complete output, and the usage."""

from __future__ import annotations

from dataclasses import dataclass

from services.edge_http.core.tools import ToolCall
from services.edge_http.openai_schema import Usage
from services.mesh.stubs import inference_pb2

TokenLogprobs = tuple[inference_pb2.TokenLogprob, ...]


@dataclass(frozen=True)
class Echo:
    """The prompt, before its choice's output (text completions asked to echo it)."""

    choice: int
    text: str
    logprobs: TokenLogprobs = ()  # the prompt tokens', when asked for; the first one is unscored


@dataclass(frozen=True)
class Delta:
    """A piece of one choice's output: answer text, reasoning text, whole tool calls, and the log
    probabilities of the tokens it came from (when asked for)."""

    choice: int
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    calls_before: int = 0  # the choice's tool calls sent in earlier deltas (numbers the ones here)
    logprobs: TokenLogprobs = ()


@dataclass(frozen=True)
class Finish:
    choice: int
    reason: str  # stop, length or tool_calls
    usage: Usage  # this choice's own


@dataclass(frozen=True)
class Done:
    """The request's usage: each prompt counted once, every choice's completion summed."""

    usage: Usage


OutputEvent = Echo | Delta | Finish | Done


@dataclass(frozen=True)
class WholeChoice:
    """One choice's complete output (its Delta holds all of it) and how it finished."""

    output: Delta
    finish: Finish
    echo: Echo | None = None


@dataclass(frozen=True)
class WholeAnswer:
    choices: tuple[WholeChoice, ...]  # in choice order
    usage: Usage
