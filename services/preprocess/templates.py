"""Chat templates: OpenAI messages → the prompt text the model was trained on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from services.mesh.contracts.errors import InvalidArgument
from services.mesh.contracts.json_limits import loads_bounded
from services.mesh.contracts.template_variables import variables_problem

KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass(frozen=True)
class Part:
    type: str
    text: str = ""


@dataclass(frozen=True)
class Message:
    role: str
    parts: tuple[Part, ...]
    name: str = ""
    tool_calls_json: str = ""  # an assistant turn's calls, OpenAI shape
    tool_call_id: str = ""  # a tool turn: the call it answers


def _template_tool_calls(message: Message, index: int) -> list[dict]:
    """OpenAI tool calls as chat templates take them: arguments as an object, not a JSON string."""
    field = f"messages[{index}].tool_calls"
    try:
        rendered = []
        for call in loads_bounded(message.tool_calls_json, field):
            function = call["function"]
            arguments = function.get("arguments") or "{}"
            if isinstance(arguments, str):
                arguments = loads_bounded(arguments, field)
            called = {"name": function["name"], "arguments": arguments}
            rendered.append({"id": call.get("id", ""), "type": "function", "function": called})
    except (KeyError, TypeError, AttributeError) as err:
        raise InvalidArgument(f"{field}: each needs function.name and JSON arguments ({err})", field) from err
    return rendered


def _content(message: Message, index: int, model: str) -> str:
    texts = []
    for part in message.parts:
        if part.type == "text":
            texts.append(part.text)
        elif part.type == "image_url":
            raise InvalidArgument(
                f"model {model} is text-only and cannot read image_url parts (messages[{index}])",
                f"messages[{index}].content",
            )
        else:
            raise InvalidArgument(f"unsupported content part type {part.type!r}", f"messages[{index}].content")
    # Text-only templates expect one string; parts are joined like the OpenAI API joins them.
    return "\n".join(texts)


def to_template_messages(messages: list[Message], model: str) -> list[dict[str, str]]:
    if not messages:
        raise InvalidArgument("messages must contain at least one message", "messages")
    rendered = []
    for i, message in enumerate(messages):
        if message.role not in KNOWN_ROLES:
            raise InvalidArgument(
                f"messages[{i}].role {message.role!r} is not one of {', '.join(sorted(KNOWN_ROLES))}",
                f"messages[{i}].role",
            )
        item: dict = {"role": message.role, "content": _content(message, i, model)}
        if message.name:
            item["name"] = message.name
        if message.tool_calls_json:
            item["tool_calls"] = _template_tool_calls(message, i)
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        rendered.append(item)
    return rendered


TEMPLATE_VARIABLES_FIELD = "chat_template_kwargs"


def template_variables(variables_json: str) -> dict[str, Any]:
    """The request's template variables (a JSON object), checked as the edge checks them."""
    if not variables_json:
        return {}
    variables = loads_bounded(variables_json, TEMPLATE_VARIABLES_FIELD)
    if not isinstance(variables, dict):
        raise InvalidArgument(f"{TEMPLATE_VARIABLES_FIELD} must be an object", TEMPLATE_VARIABLES_FIELD)
    problem = variables_problem(variables)
    if problem is not None:
        where = ".".join(filter(None, (TEMPLATE_VARIABLES_FIELD, problem.path)))
        raise InvalidArgument(f"{where}: {problem.reason}", TEMPLATE_VARIABLES_FIELD)
    return variables


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    model: str,
    tools_json: str = "",
    assistant_prefix: str = "",
    variables: Mapping[str, Any] | None = None,
) -> str:
    """The prompt: the template over the messages (and the tools, handed to it as the model
    expects them, and any other variables the request set), then the start of the assistant's
    turn (plus `assistant_prefix`)."""
    if not tokenizer.chat_template:
        raise InvalidArgument(f"model {model} has no chat template; use /v1/completions with a prompt", "messages")
    tools = loads_bounded(tools_json, "tools") if tools_json else None
    try:
        prompt = tokenizer.apply_chat_template(
            to_template_messages(messages, model),
            tools=tools,
            tokenize=False,
            add_generation_prompt=True,
            **(variables or {}),
        )
        return prompt + assistant_prefix
    except (jinja2.TemplateError, TypeError, ValueError) as err:
        # Templates reject what the model cannot take (e.g. roles out of order) with raise_exception;
        # a variable of a type the template cannot use fails it too.
        raise InvalidArgument(f"the chat template of {model} rejected the request: {err}", "messages") from err
