"""Token log probabilities in OpenAI's two shapes: chat's `logprobs.content` list and the legacy
completions' parallel lists."""

from __future__ import annotations

from collections.abc import Sequence

from services.edge_http.openai_schema import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from services.mesh.stubs import inference_pb2


def _bytes(token: str) -> list[int]:
    return list(token.encode())


def chat_logprobs(entries: Sequence[inference_pb2.TokenLogprob]) -> ChatLogprobs | None:
    if not entries:
        return None
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=_bytes(e.token),
                top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=_bytes(t.token)) for t in e.top],
            )
            for e in entries
        ]
    )


def completion_logprobs(
    entries: Sequence[inference_pb2.TokenLogprob], text_offset: int = 0
) -> CompletionLogprobs | None:
    """`text_offset` is where the first token's text starts in the whole completion."""
    if not entries:
        return None
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{t.token: t.logprob for t in e.top} for e in entries] if any(e.top for e in entries) else None,
        text_offset=offsets,
    )
