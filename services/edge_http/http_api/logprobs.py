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


def _legacy_top(entry: inference_pb2.TokenLogprob) -> dict[str, float]:
    """The legacy API's alternatives at one position: the `logprobs` most likely tokens and always
    the chosen one (so `logprobs: 0` still lists the chosen token, as OpenAI and vLLM do)."""
    return {t.token: t.logprob for t in entry.top} | {entry.token: entry.logprob}


def completion_logprobs(
    entries: Sequence[inference_pb2.TokenLogprob], text_offset: int = 0, first_unscored: bool = False
) -> CompletionLogprobs | None:
    """`text_offset` is where the first token's text starts in the whole completion;
    `first_unscored`: the first entry is a prompt's first token, which nothing predicted (null)."""
    if not entries:
        return None
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    scored: list[float | None] = [e.logprob for e in entries]
    tops: list[dict[str, float] | None] = [_legacy_top(e) for e in entries]
    if first_unscored:
        scored[0] = tops[0] = None
    return CompletionLogprobs(
        tokens=[e.token for e in entries], token_logprobs=scored, top_logprobs=tops, text_offset=offsets
    )


def joined(first: CompletionLogprobs | None, then: CompletionLogprobs | None) -> CompletionLogprobs | None:
    """Two runs of legacy log probabilities as one (an echoed prompt's, then the completion's)."""
    if first is None or then is None:
        return first or then
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=first.top_logprobs + then.top_logprobs,
        text_offset=first.text_offset + then.text_offset,
    )
