"""Chat templates: OpenAI messages → the prompt text the model was trained on."""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
from transformers import PreTrainedTokenizerBase

from services.mesh.errors import InvalidArgument

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
        item = {"role": message.role, "content": _content(message, i, model)}
        if message.name:
            item["name"] = message.name
        rendered.append(item)
    return rendered


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[Message], model: str) -> str:
    if not tokenizer.chat_template:
        raise InvalidArgument(f"model {model} has no chat template; use /v1/completions with a prompt", "messages")
    try:
        return tokenizer.apply_chat_template(
            to_template_messages(messages, model), tokenize=False, add_generation_prompt=True
        )
    except jinja2.TemplateError as err:
        # Templates reject what the model cannot take (e.g. roles out of order) with raise_exception.
        raise InvalidArgument(f"the chat template of {model} rejected the messages: {err}", "messages") from err
