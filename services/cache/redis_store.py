"""Completions shared by every cache replica through Redis.

TTL is Redis expiry; the entry and byte bounds are kept by Lua scripts that run atomically in
Redis (an LRU order in a sorted set, sizes in a hash, a byte counter), so several cache
replicas never overshoot them together. All keys share one hash tag, so the scripts also run
on Redis Cluster. When Redis is unreachable the store answers misses and refuses stores with
a warning: the cache is an optimisation and must never fail a request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from services.cache.store import StoreStats
from services.mesh.redis_client import ThrottledWarning, sync_client

log = logging.getLogger(__name__)

_PREFIX = "sluice:{cache}:"
_LRU, _SIZES, _BYTES = _PREFIX + "lru", _PREFIX + "sizes", _PREFIX + "bytes"

# A hit refreshes the entry's LRU position; a miss on a key the LRU still lists (it expired)
# releases its bytes.
_GET = """
local value = redis.call('GET', KEYS[1])
local now = redis.call('TIME')
if value then
  redis.call('ZADD', KEYS[2], now[1] * 1000000 + now[2], ARGV[1])
  return value
end
local size = redis.call('HGET', KEYS[3], ARGV[1])
if size then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('DECRBY', KEYS[4], size)
end
return false
"""

# Store, then evict least recently used entries until both bounds hold; returns the evictions.
_PUT = """
local old = redis.call('HGET', KEYS[3], ARGV[1])
if old then redis.call('DECRBY', KEYS[4], old) end
local now = redis.call('TIME')
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now[1] * 1000000 + now[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
local total = redis.call('INCRBY', KEYS[4], ARGV[4])
local evicted = 0
while redis.call('ZCARD', KEYS[2]) > tonumber(ARGV[5]) or total > tonumber(ARGV[6]) do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not oldest then break end
  total = redis.call('DECRBY', KEYS[4], redis.call('HGET', KEYS[3], oldest) or 0)
  redis.call('ZREM', KEYS[2], oldest)
  redis.call('HDEL', KEYS[3], oldest)
  redis.call('DEL', ARGV[7] .. oldest)
  evicted = evicted + 1
end
return evicted
"""


class RedisStore:
    def __init__(
        self,
        url: str,
        max_entries: int,
        max_bytes: int,
        ttl_s: float,
        on_evict: Callable[[], None] = lambda: None,
    ) -> None:
        self._client = sync_client(url)
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._on_evict = on_evict
        self._get = self._client.register_script(_GET)
        self._put = self._client.register_script(_PUT)
        self._unreachable = ThrottledWarning(log, f"Redis at {url} unreachable (%s): answering cache misses").emit

    def get(self, key: str) -> bytes | None:
        try:
            return self._get(keys=[_PREFIX + "v:" + key, _LRU, _SIZES, _BYTES], args=[key])
        except redis.RedisError as err:
            self._unreachable(err)
            return None

    def put(self, key: str, value: bytes) -> bool:
        """Store value; False when it alone exceeds the byte bound or Redis is unreachable."""
        size = len(key) + len(value)
        if size > self._max_bytes:
            return False
        try:
            evicted = self._put(
                keys=[_PREFIX + "v:" + key, _LRU, _SIZES, _BYTES],
                args=[key, value, self._ttl_ms, size, self._max_entries, self._max_bytes, _PREFIX + "v:"],
            )
        except redis.RedisError as err:
            self._unreachable(err)
            return False
        for _ in range(int(evicted)):
            self._on_evict()
        return True

    def stats(self) -> StoreStats:
        try:
            entries, used = self._client.pipeline().zcard(_LRU).get(_BYTES).execute()
        except redis.RedisError as err:
            self._unreachable(err)
            return StoreStats(0, 0)
        return StoreStats(int(entries), int(used or 0))
