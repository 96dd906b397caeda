"""The prefix cache's bookkeeping: hash chains, shared reference-counted blocks, LRU eviction of
idle blocks only."""

from __future__ import annotations

import pytest

from services.inference.kv_blocks import BlockPool
from services.inference.prefix_cache import BlockCache
from services.mesh.contracts.prefix_hash import block_hashes, root_hash

ROOT = root_hash("model@1")


def test_a_blocks_hash_covers_every_token_before_it() -> None:
    a = block_hashes(list(range(40)), 8, ROOT)
    assert len(a) == 5  # full blocks only
    b = block_hashes([*list(range(20)), 999, *list(range(21, 40))], 8, ROOT)
    assert a[:2] == b[:2] and all(x != y for x, y in zip(a[2:], b[2:], strict=True))
    assert block_hashes(list(range(40)), 8, root_hash("model@2"))[0] != a[0]
    assert block_hashes(list(range(40)), 8, ROOT, known=a[:3]) == a


def _cache(blocks: int = 8) -> tuple[BlockCache, list[int]]:
    evicted: list[int] = []
    return BlockCache(BlockPool(blocks), on_evict=evicted.append), evicted


def _filled(cache: BlockCache, tokens: list[int]) -> tuple[list[int], list[bytes]]:
    """Blocks a sequence took and filled with `tokens` (8 per block), now findable, and their hashes."""
    hashes = block_hashes(tokens, 8, ROOT)
    blocks = cache.take(len(hashes))
    for block, block_hash in zip(blocks, hashes, strict=True):
        cache.register(block, block_hash)
    return blocks, hashes


def test_registered_blocks_are_found_by_the_longest_matching_prefix() -> None:
    cache, _ = _cache()
    blocks, hashes = _filled(cache, list(range(32)))
    other = block_hashes(list(range(16)) + [7] * 16, 8, ROOT)
    assert cache.match(other) == blocks[:2]
    assert cache.match(hashes) == blocks
    assert cache.match(block_hashes([5] * 32, 8, ROOT)) == []


def test_shared_blocks_are_counted_and_idle_only_when_nobody_holds_them() -> None:
    cache, _ = _cache()
    first, hashes = _filled(cache, list(range(16)))
    shared = cache.match(hashes)
    assert cache.idle_among(shared) == 0
    cache.hold(shared)
    assert [cache.refs(b) for b in first] == [2, 2]
    cache.release(first)
    assert cache.used == 2 and cache.free == 6
    cache.release(shared)
    # Released, still cached: free to hand out, and still findable.
    assert cache.used == 0 and cache.free == 8 and cache.cached == 2
    assert cache.idle_among(cache.match(hashes)) == 2


def test_eviction_takes_idle_blocks_least_recently_released_first_and_never_a_held_one() -> None:
    cache, evicted = _cache(6)
    a, _ = _filled(cache, list(range(16)))
    b, b_hashes = _filled(cache, [3] * 16)
    cache.release(a)  # idle: a's tail, then a's head
    held = cache.take(2)  # the two never-cached blocks first: nothing evicted
    assert evicted == []
    fresh = cache.take(2)
    assert evicted == [a[1], a[0]] and sorted(fresh) == sorted(a)
    assert not set(fresh) & set(b + held)
    with pytest.raises(MemoryError):
        cache.take(1)  # every block is held: nothing may be evicted
    assert cache.match(b_hashes) == b


def test_a_second_block_with_the_same_content_stays_unindexed_and_is_freed() -> None:
    cache, _ = _cache(4)
    hashes = block_hashes(list(range(8)), 8, ROOT)
    first, second = cache.take(1), cache.take(1)
    cache.register(first[0], hashes[0])
    cache.register(second[0], hashes[0])
    cache.release(second)
    assert cache.cached == 1 and cache.pool.free == 3  # the duplicate went back to the free list
    assert cache.match(hashes) == first


def test_disabled_cache_indexes_nothing() -> None:
    cache = BlockCache(BlockPool(4), enabled=False)
    hashes = block_hashes(list(range(8)), 8, ROOT)
    block = cache.take(1)
    cache.register(block[0], hashes[0])
    assert cache.match(hashes) == [] and cache.cached == 0
    cache.release(block)
    assert cache.pool.free == 4
