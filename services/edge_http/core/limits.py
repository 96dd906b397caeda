"""Per-key rate limits: token buckets for requests and tokens per minute.

A bucket holds up to `per_minute` units and refills at per_minute/60 per second. Taking more
than it holds is refused with the seconds until it would succeed (Retry-After). Token
reservations are taken before generation (prompt + max_tokens) and settled with the real
usage afterwards: what was not used is put back.

With several edge replicas the buckets must be shared: with `cache_backend = "redis"` they
live in Redis and one Lua script takes from them atomically; when Redis is unreachable each
edge falls back to its own buckets (and says so), so limits loosen but nothing fails.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis
import redis.asyncio

from services.mesh.redis_client import ThrottledWarning, async_client

log = logging.getLogger(__name__)


@dataclass
class Bucket:
    """One token bucket (pure logic; the clock is passed in)."""

    capacity: float
    level: float
    updated: float

    def take(self, amount: float, now: float, force: bool = False) -> float:
        """Take `amount` (negative puts back); 0.0 on success, else the seconds to wait. `force`
        takes it anyway (usage learnt after the fact), leaving the bucket in debt."""
        rate = self.capacity / 60.0
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now
        if amount > self.level and amount > 0 and not force:
            return (amount - self.level) / rate
        self.level = min(self.capacity, self.level - amount)
        return 0.0


class Buckets(Protocol):
    async def take(self, key: str, per_minute: int, amount: int, force: bool = False) -> float: ...


class LocalBuckets:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, Bucket] = {}

    async def take(self, key: str, per_minute: int, amount: int, force: bool = False) -> float:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None or bucket.capacity != per_minute:  # a changed limit starts a full bucket
            bucket = self._buckets[key] = Bucket(per_minute, per_minute, now)
        return bucket.take(amount, now, force)


# The same bucket in Redis, timed by Redis's clock so every edge agrees.
# KEYS[1]: the bucket hash; ARGV: capacity, amount, force (1: take even into debt).
# Returns the wait in microseconds (0: taken).
_TAKE = """
local capacity = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local rate = capacity / 60000000
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local state = redis.call('HMGET', KEYS[1], 'level', 'updated', 'capacity')
local level, updated = tonumber(state[1]), tonumber(state[2])
if level == nil or tonumber(state[3]) ~= capacity then
  level, updated = capacity, now
end
level = math.min(capacity, level + (now - updated) * rate)
local wait = 0
if amount > 0 and amount > level and ARGV[3] ~= '1' then
  wait = math.ceil((amount - level) / rate)
else
  level = math.min(capacity, level - amount)
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'updated', now, 'capacity', capacity)
redis.call('PEXPIRE', KEYS[1], 61000)
return wait
"""


class RedisBuckets:
    def __init__(self, url: str, fallback: Buckets | None = None) -> None:
        self._client = async_client(url)
        self._take = self._client.register_script(_TAKE)
        self._fallback = fallback or LocalBuckets()
        self._warning = ThrottledWarning(log, f"Redis at {url} unreachable (%s): rate limits are per edge process")

    async def take(self, key: str, per_minute: int, amount: int, force: bool = False) -> float:
        try:
            wait_us = await self._take(keys=[f"sluice:{{limits}}:{key}"], args=[per_minute, amount, int(force)])
        except redis.RedisError as err:
            self._warning.emit(err)
            return await self._fallback.take(key, per_minute, amount, force)
        return int(wait_us) / 1e6


@dataclass(frozen=True)
class Refused:
    what: str  # "requests" or "tokens"
    limit: int
    retry_after_s: int


class Limiter:
    """Requests and tokens per minute for each key."""

    def __init__(self, buckets: Buckets) -> None:
        self._buckets = buckets

    async def admit(self, key_id: str, rpm: int) -> Refused | None:
        if not rpm:
            return None
        wait = await self._buckets.take(f"{key_id}:rpm", rpm, 1)
        return Refused("requests", rpm, math.ceil(wait)) if wait else None

    async def reserve(self, key_id: str, tpm: int, tokens: int) -> Refused | None:
        if not tpm:
            return None
        if tokens > tpm:  # could never be admitted: no point in waiting
            return Refused("tokens", tpm, 60)
        wait = await self._buckets.take(f"{key_id}:tpm", tpm, tokens)
        return Refused("tokens", tpm, math.ceil(wait)) if wait else None

    async def settle(self, key_id: str, tpm: int, reserved: int, used: int) -> None:
        if tpm and reserved != used:
            await self._buckets.take(f"{key_id}:tpm", tpm, used - reserved, force=True)
