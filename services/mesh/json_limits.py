"""Bounds on the JSON clients send: how deep it nests, and that its text is valid Unicode.

JSON allows an unpaired UTF-16 surrogate (`"\\ud800"`) and any depth; neither survives the
mesh (protobuf strings must be valid UTF-8; renderers and schema compilers recurse). Both are
found here by an iterative walk, so no depth of input makes Python recurse, and reported as
the request's error naming the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from services.mesh.errors import InvalidArgument

# Far beyond any real tool or response schema (OpenAI allows 10 levels of schema nesting,
# about 20 of JSON), far below what makes a recursive consumer fail.
MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")
_PATH_PARTS_SHOWN = 4  # a too-deep path is named by where it starts


@dataclass(frozen=True)
class JsonProblem:
    path: str  # e.g. messages[0].content; empty for the document itself
    reason: str


def _path(parts: tuple[str | int, ...]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _bad_text(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def find_problem(document: Any, max_depth: int = MAX_DEPTH) -> JsonProblem | None:
    """The first string with an unpaired surrogate or container nested deeper than `max_depth`
    in a parsed JSON document, or None."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(document, ())]
    while stack:
        value, parts = stack.pop()
        if isinstance(value, str):
            if _bad_text(value):
                return JsonProblem(_path(parts), "contains an unpaired UTF-16 surrogate, which is not valid Unicode")
            continue
        if not isinstance(value, dict | list):
            continue
        if len(parts) >= max_depth:
            return JsonProblem(_path(parts[:_PATH_PARTS_SHOWN]), f"nests deeper than {max_depth} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if _bad_text(key):
                    return JsonProblem(_path(parts), "has a key with an unpaired UTF-16 surrogate")
                stack.append((item, (*parts, key)))
        else:
            stack.extend((item, (*parts, i)) for i, item in enumerate(value))
    return None


def loads_bounded(text: str, field: str) -> Any:
    """JSON text a request carries in a field (a tool schema, a response schema), parsed and
    checked; InvalidArgument naming the field when it is not valid or too deep."""
    try:
        document = json.loads(text)
    except RecursionError:
        raise InvalidArgument(f"{field}: nests deeper than {MAX_DEPTH} levels", field) from None
    except ValueError as err:
        raise InvalidArgument(f"{field}: not valid JSON ({err})", field) from None
    problem = find_problem(document)
    if problem is not None:
        where = field + ("" if not problem.path or problem.path[0] == "[" else ".") + problem.path
        raise InvalidArgument(f"{where}: {problem.reason}", field)
    return document
