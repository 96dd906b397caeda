"""Fit a request to the model: a non-empty prompt, and max_tokens within the context window and
the deployment's limit. The only default applied here is the one that needs the prompt's
length: an unset max_tokens."""

from __future__ import annotations

from services.mesh.contracts.errors import ContextLengthExceeded, InvalidArgument
from services.mesh.stubs import common_pb2


def resolve_sampling(
    sampling: common_pb2.SamplingParams, prompt_tokens: int, context_length: int, limit: int = 0
) -> common_pb2.SamplingParams:
    """Copy of the parameters with max_tokens resolved: unset means all the room the context
    leaves, at most `limit` (0: no limit)."""
    if prompt_tokens == 0:
        raise InvalidArgument("the prompt is empty", "prompt")
    room = context_length - prompt_tokens
    if room < 1:
        raise ContextLengthExceeded(
            f"the prompt is {prompt_tokens} tokens, which fills the model's context length of "
            f"{context_length} tokens; shorten the messages",
            "messages",
        )
    if sampling.max_tokens < 0:
        raise InvalidArgument("max_tokens must be at least 1", "max_tokens")
    if limit and sampling.max_tokens > limit:
        raise InvalidArgument(f"max_tokens: at most {limit} per request", "max_tokens")
    if sampling.max_tokens > room:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {context_length} tokens; you requested "
            f"{prompt_tokens + sampling.max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{sampling.max_tokens} for the completion)",
            "max_tokens",
        )
    resolved = common_pb2.SamplingParams()
    resolved.CopyFrom(sampling)
    resolved.max_tokens = sampling.max_tokens or (min(room, limit) if limit else room)
    return resolved
