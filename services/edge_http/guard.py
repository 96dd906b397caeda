"""What a request must pass at the edge before it costs anything: an API key, access to the
model, the key's request and token rates, and the deployment's size limits."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.edge_http.errors import OpenAIError
from services.edge_http.keys import KeyRecord, KeyStore
from services.edge_http.limits import Limiter, LocalBuckets, RedisBuckets, Refused
from services.edge_http.observe import record
from services.edge_http.openai_schema import ChatCompletionRequest, SamplingFields
from services.edge_http.pipeline import Event
from services.mesh.config import Settings

log = logging.getLogger(__name__)

NO_AUTH_WARNING = "AUTHENTICATION IS OFF (--no-auth): anyone who reaches the edge can use every model without a key"
Settle = Callable[[int | None], Awaitable[None]]
bearer = HTTPBearer(auto_error=False, description="an API key from `sluice keys create`")


def _rate_limited(refused: Refused) -> OpenAIError:
    return OpenAIError(
        429,
        f"rate limit reached: this key allows {refused.limit} {refused.what} per minute",
        "rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(max(1, refused.retry_after_s))},
    )


class Guard:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._keys = KeyStore(settings.keys_file)
        buckets = RedisBuckets(settings.redis_url) if settings.cache_backend == "redis" else LocalBuckets()
        self._limiter = Limiter(buckets)
        if not settings.auth:
            log.warning(NO_AUTH_WARNING)

    async def authenticate(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None
    ) -> KeyRecord | None:
        """The caller's key (None with --no-auth), after its request rate is charged."""
        if not self._settings.auth:
            return None
        if credentials is None:
            raise OpenAIError(
                401,
                "no API key: send it as `Authorization: Bearer <key>`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        key = self._keys.verify(credentials.credentials)
        if key is None:
            raise OpenAIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        record(request.scope).key_name = key.name
        refused = await self._limiter.admit(key.id, key.rpm)
        if refused:
            raise _rate_limited(refused)
        return key

    def allow_model(self, key: KeyRecord | None, name: str, model_id: str) -> None:
        """A key restricted to some models may use them by id or by an alias it was given."""
        if key is not None and not (key.allows(name) or key.allows(model_id)):
            # As OpenAI does: a model the key may not use is indistinguishable from a missing one.
            raise OpenAIError(
                404,
                f"the model `{name}` does not exist or you do not have access to it",
                param="model",
                code="model_not_found",
            )

    def check(self, body: SamplingFields) -> None:
        """The deployment's request-shape limits."""
        limit = self._settings.max_tokens_limit
        if body.max_tokens is not None and body.max_tokens > limit:
            raise OpenAIError(400, f"max_tokens: at most {limit} per request", param="max_tokens", code="invalid_value")
        if isinstance(body, ChatCompletionRequest) and len(body.messages) > self._settings.max_messages:
            raise OpenAIError(
                400,
                f"messages: at most {self._settings.max_messages} per request",
                param="messages",
                code="invalid_value",
            )

    async def reserve(self, key: KeyRecord | None, tokens: int) -> Settle:
        """Charge `tokens` to the key's tokens per minute; returns the settlement, to call with the
        tokens really used (None if unknown: nothing is given back). A generation reserves
        prompt + max_tokens; an embedding, whose size is known only afterwards, reserves 1 and
        settles with its usage."""
        if key is not None:
            refused = await self._limiter.reserve(key.id, key.tpm, tokens)
            if refused:
                raise _rate_limited(refused)

        async def settle(used: int | None) -> None:
            if key is not None and used is not None:
                await self._limiter.settle(key.id, key.tpm, tokens, used)

        return settle


def audited(request: Request, settle: Settle) -> Settle:
    """The settlement, also noting the tokens used on the request's audit line."""

    async def account(used: int | None) -> None:
        record(request.scope).tokens = used
        await settle(used)

    return account


async def settled(events: AsyncIterator[Event], first: Event, settle: Settle) -> AsyncIterator[Event]:
    """A run's remaining events; once it ends, `settle` gets the tokens it used (None if it never finished)."""
    last = first if first.finish_reason else None
    try:
        async for event in events:
            last = event if event.finish_reason else last
            yield event
    finally:
        await settle(None if last is None else last.prompt_tokens + last.completion_tokens)


def shared_settle(settle: Settle, run_prompts: list[int], prompt_tokens: int) -> list[Settle]:
    """One settlement for the runs of a request (`n` > 1, several prompts), made once all have
    reported, each with its own prompt's size in `run_prompts`: every prompt counted once
    (`prompt_tokens`), as in the response's usage (None if any run's use is unknown)."""
    reported: dict[int, int | None] = {}

    def part(index: int) -> Settle:
        async def report(used: int | None) -> None:
            reported[index] = used
            if len(reported) < len(run_prompts):
                return
            if any(value is None for value in reported.values()):
                await settle(None)
                return
            completions = sum(used - run_prompts[i] for i, used in reported.items())  # type: ignore[operator]
            await settle(prompt_tokens + completions)

        return report

    return [part(index) for index in range(len(run_prompts))]
