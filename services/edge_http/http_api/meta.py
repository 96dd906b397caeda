"""What every object of one OpenAI response repeats, and how an endpoint's answers look."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pydantic import BaseModel

from services.edge_http.core.events import OutputEvent, WholeAnswer

# Where reasoning text goes in a response: DeepSeek's field (Dify, most clients) and vLLM's newer one.
REASONING_FIELDS = ("reasoning_content", "reasoning")


@dataclass(frozen=True)
class ResponseMeta:
    id: str
    created: int
    model: str
    reasons: bool = False  # the output may open with reasoning: whole messages carry the fields, empty or not
    reasoning_fields: tuple[str, ...] = REASONING_FIELDS  # the names reasoning text is sent under
    include_usage: bool = False  # a stream ends with a usage chunk


Events = AsyncIterator[OutputEvent]


@dataclass(frozen=True)
class Shape:
    """How one endpoint answers: its response ids' prefix, a generation's whole answer in its
    shape, and the chunks it streams a generation's events as."""

    id_prefix: str
    whole: Callable[[WholeAnswer, ResponseMeta], BaseModel]
    chunks: Callable[[Events, ResponseMeta], AsyncIterator[BaseModel]]
