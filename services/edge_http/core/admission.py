"""What a request must pass at the edge before it costs anything: a valid credential, access to
the model, the caller's request and token rates, and the deployment's size limits.

Admission reserves; accounting.py settles what was really used."""

from __future__ import annotations

import logging

from services.edge_http.core.accounting import Settle
from services.edge_http.core.context import RequestRecord
from services.edge_http.core.failures import EdgeError, Failure
from services.edge_http.core.keys import KeyRecord, KeyStore
from services.edge_http.core.limits import Limiter, LocalBuckets, RedisBuckets, Refused
from services.edge_http.openai_schema import ChatCompletionRequest, SamplingFields
from services.mesh.config import Settings

log = logging.getLogger(__name__)

NO_AUTH_WARNING = "AUTHENTICATION IS OFF (--no-auth): anyone who reaches the edge can use every model without a key"

# Who is calling: their key's record, or None when the edge runs --no-auth.
Caller = KeyRecord | None


def _rate_limited(refused: Refused) -> EdgeError:
    return EdgeError(
        Failure.RATE_LIMITED,
        f"rate limit reached: this key allows {refused.limit} {refused.what} per minute",
        code="rate_limit_exceeded",
        retry_after_s=max(1, refused.retry_after_s),
    )


class Guard:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._keys = KeyStore(settings.keys_file)
        buckets = RedisBuckets(settings.redis_url) if settings.cache_backend == "redis" else LocalBuckets()
        self._limiter = Limiter(buckets)
        if not settings.auth:
            log.warning(NO_AUTH_WARNING)

    async def authenticate(self, credential: str | None, record: RequestRecord) -> Caller:
        """The caller of `credential` (an API key; None when none was sent), after its request rate
        is charged; None with --no-auth."""
        if not self._settings.auth:
            return None
        if credential is None:
            raise EdgeError(
                Failure.UNAUTHENTICATED, "no API key: send it as `Authorization: Bearer <key>`", code="invalid_api_key"
            )
        key = self._keys.verify(credential)
        if key is None:
            raise EdgeError(Failure.UNAUTHENTICATED, "invalid API key", code="invalid_api_key")
        record.key_name = key.name
        refused = await self._limiter.admit(key.id, key.rpm)
        if refused:
            raise _rate_limited(refused)
        return key

    def allow_model(self, caller: Caller, name: str, model_id: str) -> None:
        """A key restricted to some models may use them by id or by an alias it was given."""
        if caller is not None and not (caller.allows(name) or caller.allows(model_id)):
            # As OpenAI does: a model the key may not use is indistinguishable from a missing one.
            raise EdgeError(
                Failure.NOT_FOUND,
                f"the model `{name}` does not exist or you do not have access to it",
                param="model",
                code="model_not_found",
            )

    def check(self, body: SamplingFields) -> None:
        """The deployment's request-shape limits."""
        limit = self._settings.max_tokens_limit
        if body.max_tokens is not None and body.max_tokens > limit:
            raise EdgeError(
                Failure.INVALID, f"max_tokens: at most {limit} per request", param="max_tokens", code="invalid_value"
            )
        if isinstance(body, ChatCompletionRequest) and len(body.messages) > self._settings.max_messages:
            raise EdgeError(
                Failure.INVALID,
                f"messages: at most {self._settings.max_messages} per request",
                param="messages",
                code="invalid_value",
            )

    async def reserve(self, caller: Caller, tokens: int) -> Settle:
        """Charge `tokens` to the caller's tokens per minute; returns the settlement, to call with the
        tokens really used (None if unknown: nothing is given back). A generation reserves
        prompt + max_tokens; an embedding, whose size is known only afterwards, reserves 1 and
        settles with its usage."""
        if caller is not None:
            refused = await self._limiter.reserve(caller.id, caller.tpm, tokens)
            if refused:
                raise _rate_limited(refused)

        async def settle(used: int | None) -> None:
            if caller is not None and used is not None:
                await self._limiter.settle(caller.id, caller.tpm, tokens, used)

        return settle
