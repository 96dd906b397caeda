"""The Redis cache backend against a real redis-server."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshproc import wait_for
from redisproc import redis_server

from services.cache.redis_store import RedisStore
from services.cache.store import StoreStats


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path) as running:
        yield running


def test_replicas_share_entries(url: str) -> None:
    one, two = (RedisStore(url, 100, 1 << 20, 60) for _ in range(2))
    assert one.put("k", b"completion")
    assert two.get("k") == b"completion"
    assert two.get("absent") is None
    assert one.stats().entries == 1
    assert one.stats().bytes == len("k") + len(b"completion")


def test_entries_expire_by_redis_ttl_and_release_their_bytes(url: str) -> None:
    store = RedisStore(url, 100, 1 << 20, ttl_s=0.2)
    store.put("k", b"soon gone")
    assert store.get("k") == b"soon gone"
    assert wait_for(lambda: store.get("k") is None, timeout=5)
    assert store.stats() == StoreStats(0, 0)


def test_byte_bound_evicts_least_recently_used_across_replicas(url: str) -> None:
    evictions: list[int] = []
    one = RedisStore(url, 100, max_bytes=40, ttl_s=60, on_evict=lambda: evictions.append(1))
    two = RedisStore(url, 100, max_bytes=40, ttl_s=60)
    one.put("a", b"x" * 9)  # 10 bytes each, key included
    two.put("b", b"x" * 9)
    one.put("c", b"x" * 9)
    assert two.get("a") is not None  # a is now the most recently used
    one.put("d", b"x" * 19)  # 20 bytes: over 40, so the least recently used (b) goes
    assert one.get("b") is None
    assert [one.get(k) is not None for k in "acd"] == [True, True, True]
    assert one.stats().bytes == 40
    assert evictions == [1]
    assert not one.put("huge", b"x" * 100)  # alone over the bound: refused, nothing evicted


def test_entry_bound(url: str) -> None:
    store = RedisStore(url, max_entries=3, max_bytes=1 << 20, ttl_s=60)
    for key in "abcde":
        store.put(key, b"v")
    assert store.stats().entries == 3
    assert [store.get(k) for k in "abcde"] == [None, None, b"v", b"v", b"v"]


def test_redis_down_means_misses_and_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with redis_server(tmp_path) as running:
        store = RedisStore(running, 100, 1 << 20, 60)
        assert store.put("k", b"v")
    with caplog.at_level(logging.WARNING):
        assert store.get("k") is None
        assert store.put("k", b"v") is False
        assert store.stats() == StoreStats(0, 0)
    assert "unreachable" in caplog.text
    assert caplog.text.count("unreachable") == 1  # warned once, not per call
