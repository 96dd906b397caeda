"""How a model writes tool calls: the one list of formats, for the inference service that
announces its model's format and the edge that parses it."""

from __future__ import annotations

import enum


class ToolFormat(enum.StrEnum):
    # `<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks (Qwen2.5, Hermes, many fine-tunes)
    HERMES = "hermes"
    # the whole output is one JSON object {"name", "arguments" | "parameters"} or a list (Llama 3.1)
    JSON = "json"
