"""In-memory completion store: LRU over entry count and bytes, entries expire after a TTL."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StoreStats:
    entries: int
    bytes: int


class Store(Protocol):
    """What the cache service needs of a backend (this in-memory one, or redis_store.RedisStore)."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> bool: ...

    def stats(self) -> StoreStats: ...


class CompletionStore:
    """Maps cache keys to serialized completions. Thread-safe; O(1) lookup and store."""

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[], None] = lambda: None,
    ) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._clock = clock
        self._on_evict = on_evict
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def _size(self, key: str, value: bytes) -> int:
        return len(key) + len(value)

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self._bytes -= self._size(key, value)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._entries.get(key)
            if item is None:
                return None
            expires, value = item
            if self._clock() >= expires:
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> bool:
        """Store value; False when it alone exceeds the byte bound."""
        size = self._size(key, value)
        if size > self._max_bytes:
            return False
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (self._clock() + self._ttl_s, value)
            self._bytes += size
            while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
                self._drop(next(iter(self._entries)))
                self._on_evict()
        return True

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(len(self._entries), self._bytes)
