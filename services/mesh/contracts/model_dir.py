"""Facts about a Hugging Face model directory that need no weights (shared with preprocess)."""

from __future__ import annotations

import json
from collections.abc import Container
from pathlib import Path

from transformers import AutoConfig

from services.mesh.contracts.tool_formats import ToolFormat

# Config keys models use for their context window, most specific first.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model directory (no config.json); "
            "run `sluice model init` for the default model or pass --model PATH"
        )


def context_length(path: Path) -> int:
    config = AutoConfig.from_pretrained(path)
    text_config = getattr(config, "text_config", None) or config
    for key in _CONTEXT_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{path}/config.json names no context length (looked for {', '.join(_CONTEXT_KEYS)})")


def vocab_size(path: Path) -> int:
    """Rows of the model's embedding: every token id it takes (its tokenizer's and any padding)."""
    config = AutoConfig.from_pretrained(path)
    return int((getattr(config, "text_config", None) or config).vocab_size)


def model_kind(path: Path) -> str:
    """ "chat" for a generative model, "embedding" for an encoder (sentence-transformers layout or a bare *Model)."""
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    if any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in architectures):
        return "chat"
    if (path / "modules.json").is_file() or any(a.endswith("Model") for a in architectures):
        return "embedding"
    return "chat"


def reasoning_tags(setting: str, vocabulary: Container[str]) -> tuple[str, str] | None:
    """The tags around the reasoning block: `auto` finds `<think>` in the tokenizer's vocabulary
    (DeepSeek-R1, Qwen3), `none` turns it off, `OPEN,CLOSE` names them."""
    if setting.lower() in ("", "none", "off"):
        return None
    if setting.lower() == "auto":
        return ("<think>", "</think>") if "<think>" in vocabulary else None
    open_tag, sep, close_tag = setting.partition(",")
    if not sep or not open_tag.strip() or not close_tag.strip():
        raise ValueError(f"reasoning_tags: expected OPEN,CLOSE (e.g. <think>,</think>), not {setting!r}")
    return open_tag.strip(), close_tag.strip()


def tool_parser(setting: str, chat_template: str | None) -> ToolFormat | None:
    """How the model writes tool calls: `auto` reads its chat template (`<tool_call>` → hermes,
    another template that takes `tools` → json), a format by name, or none."""
    choice = setting.lower()
    if choice in ("", "none", "off"):
        return None
    if choice in tuple(ToolFormat):
        return ToolFormat(choice)
    if choice != "auto":
        names = ", ".join(ToolFormat)
        raise ValueError(f"tool_parser: expected auto, {names} or none, not {setting!r}")
    template = chat_template or ""
    if "<tool_call>" in template:
        return ToolFormat.HERMES
    return ToolFormat.JSON if "tools" in template else None
