"""Variables a request hands to the model's chat template: `chat_template_kwargs`, and the thinking
switch and reasoning effort the request sets at top level. One check, applied where the request
enters (the edge) and again by preprocess for direct gRPC callers.

Templates read what they know (Qwen3: `enable_thinking`; DeepSeek-V3.1: `thinking`; gpt-oss:
`reasoning_effort`) and ignore the rest. Names the renderer itself owns (the messages, tools,
generation prompt, special tokens, its helpers) cannot be set: they would change what the
template means, not what it is asked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from services.mesh.contracts.json_limits import JsonProblem

RESERVED = frozenset(
    {
        # what apply_chat_template and its renderer take or pass themselves
        "messages",
        "conversation",
        "conversations",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        # the tokenizer's special tokens, which templates place themselves
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
        "additional_special_tokens",
        # helpers the renderer provides
        "raise_exception",
        "strftime_now",
    }
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_VARIABLES = 32
MAX_JSON_BYTES = 16 * 1024


def variables_problem(variables: Mapping[str, Any]) -> JsonProblem | None:
    """What is wrong with these template variables (paths relative to them), or None."""
    if len(variables) > MAX_VARIABLES:
        return JsonProblem("", f"at most {MAX_VARIABLES} variables")
    for name in variables:
        if not _NAME.fullmatch(name):
            return JsonProblem(name, "is not a template variable name (letters, digits and _, at most 64)")
        if name in RESERVED:
            return JsonProblem(name, "is set by the chat template's renderer itself and cannot be passed")
    if len(canonical(variables).encode()) > MAX_JSON_BYTES:
        return JsonProblem("", f"at most {MAX_JSON_BYTES} bytes of JSON")
    return None


def canonical(variables: Mapping[str, Any]) -> str:
    """The variables as JSON text that is the same for the same variables (for the wire and cache keys)."""
    return json.dumps(variables, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
