"""The core's events → text_completion objects, whole or streamed, with the prompt echoed before
its completion when asked (and its tokens' log probabilities, the first one null as OpenAI's are)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.edge_http.core.events import Delta, Done, Echo, Finish, OutputEvent, WholeAnswer
from services.edge_http.http_api.logprobs import completion_logprobs, joined
from services.edge_http.http_api.meta import ResponseMeta, Shape
from services.edge_http.openai_schema import Completion, CompletionChoice, CompletionLogprobs


def whole(answer: WholeAnswer, meta: ResponseMeta) -> Completion:
    choices = []
    for choice in answer.choices:
        echo, out = choice.echo, choice.output
        prefix = echo.text if echo else ""
        prefix_logprobs = completion_logprobs(echo.logprobs, first_unscored=True) if echo else None
        logprobs = joined(prefix_logprobs, completion_logprobs(out.logprobs, text_offset=len(prefix)))
        text = prefix + out.content
        reason = choice.finish.reason
        choices.append(CompletionChoice(index=out.choice, text=text, logprobs=logprobs, finish_reason=reason))
    return Completion(id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=answer.usage)


async def chunks(events: AsyncIterator[OutputEvent], meta: ResponseMeta) -> AsyncIterator[Completion]:
    def chunk(
        choice: int, text: str, finish_reason: str | None = None, logprobs: CompletionLogprobs | None = None
    ) -> Completion:
        return Completion(
            id=meta.id,
            created=meta.created,
            model=meta.model,
            choices=[CompletionChoice(index=choice, text=text, logprobs=logprobs, finish_reason=finish_reason)],
        )

    offsets: dict[int, int] = {}  # where each choice's next token starts in its text
    async for event in events:
        if isinstance(event, Echo):
            yield chunk(event.choice, event.text, logprobs=completion_logprobs(event.logprobs, first_unscored=True))
            offsets[event.choice] = len(event.text)
        elif isinstance(event, Delta):
            offset = offsets.get(event.choice, 0)
            logprobs = completion_logprobs(event.logprobs, offset)
            offsets[event.choice] = offset + sum(len(e.token) for e in event.logprobs)
            if event.content or logprobs:
                yield chunk(event.choice, event.content, logprobs=logprobs)
        elif isinstance(event, Finish):
            yield chunk(event.choice, "", event.reason)
        elif isinstance(event, Done) and meta.include_usage:
            yield Completion(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=event.usage)


SHAPE = Shape("cmpl", whole, chunks)
