"""Prefix caching: computed KV blocks found again by their content.

A full block's keys and values depend only on the tokens up to its end, so a block is indexed by
the hash chain of those tokens (services/mesh/contracts/prefix_hash.py) and any sequence whose prompt
starts with the same tokens reads it instead of computing it. Blocks are reference-counted and
shared read-only: a sequence only ever writes past the blocks it matched. A block no sequence
holds keeps its content and stays findable until its memory is wanted: fresh blocks come from
the never-cached free list first, then by evicting the least recently used idle cached block.
Pure bookkeeping, like BlockPool, whose free list it draws on.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

from services.inference.kv_blocks import BlockPool
from services.mesh.contracts.prefix_hash import BlockHash


class BlockCache:
    def __init__(self, pool: BlockPool, enabled: bool = True, on_evict: Callable[[int], None] = lambda _: None) -> None:
        self.pool = pool
        self.enabled = enabled
        self._on_evict = on_evict
        self._refs: dict[int, int] = {}  # blocks sequences hold, with how many hold each
        self._by_hash: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        # Cached blocks no sequence holds, least recently released first: evicted in this order.
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()

    @property
    def count(self) -> int:
        return self.pool.count

    @property
    def free(self) -> int:
        """Blocks a sequence can be given: never used, or cached but idle."""
        return self.pool.free + len(self._idle)

    @property
    def used(self) -> int:
        """Blocks sequences hold."""
        return self.pool.count - self.free

    @property
    def cached(self) -> int:
        """Blocks findable by content (held or idle)."""
        return len(self._hash_of)

    def refs(self, block: int) -> int:
        return self._refs.get(block, 0)

    def match(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (not yet held)."""
        found = []
        for block_hash in hashes if self.enabled else ():
            block = self._by_hash.get(block_hash)
            if block is None:
                break
            found.append(block)
        return found

    def idle_among(self, blocks: Sequence[int]) -> int:
        """How many of these cached blocks holding them would take out of the free count."""
        return sum(1 for block in blocks if block in self._idle)

    def hold(self, blocks: Sequence[int]) -> None:
        """Share matched blocks with one more sequence."""
        for block in blocks:
            self._refs[block] = self._refs.get(block, 0) + 1
            self._idle.pop(block, None)

    def take(self, n: int) -> list[int]:
        """`n` blocks for one sequence to write into, evicting idle cached ones if the free list is short."""
        if n > self.free:
            raise MemoryError(f"{n} KV blocks wanted, {self.free} free")
        blocks = self.pool.take(min(n, self.pool.free))
        while len(blocks) < n:
            block, _ = self._idle.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
            self._on_evict(block)
            blocks.append(block)
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """A sequence lets go of its blocks. Released last block first, so a chain's tail is evicted
        before the head that other prompts are likelier to share."""
        for block in reversed(blocks):
            left = self._refs[block] - 1
            if left:
                self._refs[block] = left
                continue
            del self._refs[block]
            if block in self._hash_of:
                self._idle[block] = None
            else:
                self.pool.give_back([block])

    def register(self, block: int, block_hash: BlockHash) -> None:
        """Index a block a sequence has filled. A second block computed with the same content (two
        prompts prefilled side by side) stays unindexed and is freed with its sequence."""
        if self.enabled and block_hash not in self._by_hash and block not in self._hash_of:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash
