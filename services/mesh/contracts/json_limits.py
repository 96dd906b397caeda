"""Bounds on the JSON clients send: how deep it nests, and that its text is valid Unicode.

JSON allows any depth and an unpaired UTF-16 surrogate (`"\\ud800"`); neither survives the
mesh (parsers, template renderers and schema compilers recurse; protobuf strings must be valid
UTF-8). Depth is measured on the text before anything parses it, surrogates in the parsed
document by an iterative walk; each is reported as the request's error naming the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from services.mesh.contracts.errors import InvalidArgument

# Far beyond any real tool or response schema (OpenAI allows 10 levels of schema nesting,
# about 20 of JSON), far below what makes a recursive consumer fail.
MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")
# The tokens that shape JSON text: strings (whole, escapes and all), brackets, colons, commas.
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}:,]')
_PATH_PARTS_SHOWN = 4  # a too-deep path is named by where it starts


@dataclass(frozen=True)
class JsonProblem:
    path: str  # e.g. messages[0].content; empty for the document itself
    reason: str


def _path(parts: list[str | int | None]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _key(token: str) -> str:
    try:
        return json.loads(token)
    except ValueError:
        return token[1:-1]


def depth_problem(text: str, max_depth: int = MAX_DEPTH) -> JsonProblem | None:
    """Where JSON text nests deeper than `max_depth`, found without parsing it: text with fewer
    brackets cannot, and the scan stops at the first container too deep."""
    if text.count("[") + text.count("{") <= max_depth:
        return None
    # Per open container, the key or index that leads further in (keys decoded only when shown).
    path: list[str | int | None] = []
    kinds: list[str] = []
    last_string = ""
    for match in _TOKENS.finditer(text):
        token = match[0]
        if token in ("[", "{"):
            if len(kinds) == max_depth:
                return JsonProblem(_path(path[:_PATH_PARTS_SHOWN]), f"nests deeper than {max_depth} levels")
            kinds.append(token)
            path.append(0 if token == "[" else None)
        elif token in ("]", "}"):
            if kinds:
                kinds.pop()
                path.pop()
        elif token == ",":
            if kinds and kinds[-1] == "[":
                path[-1] += 1  # type: ignore[operator]
        elif token == ":":
            if kinds and len(kinds) <= _PATH_PARTS_SHOWN:
                path[-1] = _key(last_string)
        else:
            last_string = token
    return None


def _bad_text(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def text_problem(document: Any) -> JsonProblem | None:
    """The first string (or key) with an unpaired surrogate in a parsed JSON document, or None."""
    stack: list[tuple[Any, list[str | int | None]]] = [(document, [])]
    while stack:
        value, parts = stack.pop()
        if isinstance(value, str):
            if _bad_text(value):
                return JsonProblem(_path(parts), "contains an unpaired UTF-16 surrogate, which is not valid Unicode")
        elif isinstance(value, dict):
            for key, item in value.items():
                if _bad_text(key):
                    return JsonProblem(_path(parts), "has a key with an unpaired UTF-16 surrogate")
                stack.append((item, [*parts, key]))
        elif isinstance(value, list):
            stack.extend((item, [*parts, i]) for i, item in enumerate(value))
    return None


def loads_bounded(text: str, field: str) -> Any:
    """JSON text a request carries in a field (a tool schema, a response schema), parsed and
    checked; InvalidArgument naming the field when it is not valid, too deep or not Unicode."""
    problem = depth_problem(text)
    if problem is None:
        try:
            document = json.loads(text)
        except ValueError as err:
            raise InvalidArgument(f"{field}: not valid JSON ({err})", field) from None
        problem = text_problem(document)
    if problem is not None:
        where = field + ("" if not problem.path or problem.path[0] == "[" else ".") + problem.path
        raise InvalidArgument(f"{where}: {problem.reason}", field)
    return document
