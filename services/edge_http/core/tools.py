"""Tool calls in a model's output, found as it streams, per model family.

- `hermes` (Qwen2.5, Hermes, many fine-tunes): `<tool_call>{"name": …, "arguments": {…}}</tool_call>`
  blocks anywhere in the output; text around them stays content.
- `json` (Llama 3.1 style): the whole output is one JSON object `{"name", "arguments" | "parameters"}`
  or a list of them; anything else is content.

A forced call (tool_choice `required` or a named function) is written into the start of the
assistant's turn; the same text is fed to the parser first, so it reads the call whole.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from services.mesh.contracts.partial_match import partial_match
from services.mesh.contracts.tool_formats import ToolFormat

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class Parsed:
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def __iadd__(self, other: Parsed) -> Parsed:
        self.content += other.content
        self.calls += other.calls
        return self


def _call(payload: object) -> ToolCall | None:
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return None
    arguments = payload.get("arguments", payload.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(payload["name"], json.dumps(arguments, ensure_ascii=False))


class HermesParser:
    def __init__(self) -> None:
        self._held, self._in_call = "", False

    def feed(self, text: str) -> Parsed:
        self._held += text
        out = Parsed()
        while True:
            if not self._in_call:
                start = self._held.find(HERMES_OPEN)
                if start < 0:
                    keep = partial_match(self._held, HERMES_OPEN)
                    out.content += self._held[: len(self._held) - keep]
                    self._held = self._held[len(self._held) - keep :]
                    return out
                out.content += self._held[:start]
                self._held, self._in_call = self._held[start + len(HERMES_OPEN) :], True
            end = self._held.find(HERMES_CLOSE)
            if end < 0:
                return out
            body, self._held, self._in_call = self._held[:end], self._held[end + len(HERMES_CLOSE) :], False
            out += self._parse(body)

    @staticmethod
    def _parse(body: str) -> Parsed:
        try:
            call = _call(json.loads(body))
        except ValueError:
            call = None
        # Not a well-formed call: the client sees exactly what the model wrote.
        return Parsed(calls=[call]) if call else Parsed(content=HERMES_OPEN + body + HERMES_CLOSE)

    def finish(self) -> Parsed:
        held, self._held = self._held, ""
        if not self._in_call:
            return Parsed(content=held)
        self._in_call = False
        parsed = self._parse(held.strip())  # a call the model did not close (e.g. stopped at EOS)
        return parsed if parsed.calls else Parsed(content=HERMES_OPEN + held)


class JsonParser:
    def __init__(self) -> None:
        self._held, self._state = "", "start"  # start → holding (looks like JSON) | content

    def feed(self, text: str) -> Parsed:
        if self._state == "content":
            return Parsed(content=text)
        self._held += text
        stripped = self._held.lstrip()
        if not stripped:
            return Parsed()
        if stripped[0] in "{[":
            self._state = "holding"  # decided only at the end: a call, or JSON the user asked for
            return Parsed()
        self._state, held, self._held = "content", self._held, ""
        return Parsed(content=held)

    def finish(self) -> Parsed:
        held, self._held = self._held, ""
        if self._state != "holding":
            return Parsed(content=held)
        try:
            payload = json.loads(held)
        except ValueError:
            return Parsed(content=held)
        calls = [_call(item) for item in (payload if isinstance(payload, list) else [payload])]
        if not calls or any(c is None for c in calls):
            return Parsed(content=held)
        return Parsed(calls=[c for c in calls if c is not None])


@dataclass(frozen=True)
class ToolMode:
    """How a request's output carries tool calls: the model's format, and the text its turn is
    forced to start with (tool_choice `required` or a named function; empty: the model decides)."""

    format: ToolFormat
    forced_start: str = ""


def make_parser(kind: ToolFormat) -> HermesParser | JsonParser:
    return HermesParser() if kind == ToolFormat.HERMES else JsonParser()


def forced_prefix(kind: ToolFormat, function: str | None) -> str:
    """What the assistant's turn starts with to force a call (of `function`, or of any tool)."""
    if kind == ToolFormat.HERMES:
        return f'{HERMES_OPEN}\n{{"name": {json.dumps(function)}, "arguments": ' if function else f"{HERMES_OPEN}\n"
    return f'{{"name": {json.dumps(function)}, "arguments": ' if function else '{"name": "'
