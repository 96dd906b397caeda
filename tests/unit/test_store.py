from __future__ import annotations

from services.cache.store import CompletionStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_get_returns_what_was_put() -> None:
    store = CompletionStore(10, 10_000, 60)
    assert store.put("k", b"value")
    assert store.get("k") == b"value"
    assert store.get("other") is None


def test_least_recently_used_entry_is_evicted_first() -> None:
    evicted = []
    store = CompletionStore(2, 10_000, 60, on_evict=lambda: evicted.append(1))
    store.put("a", b"1")
    store.put("b", b"2")
    store.get("a")  # b becomes least recently used
    store.put("c", b"3")
    assert store.get("b") is None
    assert store.get("a") == b"1" and store.get("c") == b"3"
    assert evicted == [1]


def test_byte_bound_holds() -> None:
    store = CompletionStore(100, 50, 60)
    for i in range(10):
        store.put(f"k{i}", b"x" * 10)
    stats = store.stats()
    assert stats.bytes <= 50
    assert stats.entries == 50 // len("k0" + "x" * 10)
    assert store.get("k9") is not None and store.get("k0") is None


def test_entry_larger_than_the_bound_is_refused() -> None:
    store = CompletionStore(100, 50, 60)
    assert not store.put("big", b"x" * 100)
    assert store.stats().entries == 0


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    store = CompletionStore(10, 10_000, ttl_s=5, clock=clock)
    store.put("k", b"v")
    clock.now = 4.9
    assert store.get("k") == b"v"
    clock.now = 5.0
    assert store.get("k") is None
    assert store.stats() == type(store.stats())(0, 0)


def test_overwriting_a_key_keeps_the_byte_count_right() -> None:
    store = CompletionStore(10, 10_000, 60)
    store.put("k", b"aaaa")
    store.put("k", b"bb")
    assert store.stats().bytes == len("k") + 2
