"""KV memory as bookkeeping: which blocks of the pool are free, and which blocks each sequence
holds for which positions. No tensors here: they live in paged_attention.KVPool."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class BlockPool:
    """Which KV blocks are free. Pure bookkeeping: the tensors live in KVPool.

    Freed blocks are reused first (a stack), so a lightly loaded engine keeps touching the
    same memory and the pool's untouched pages are never committed."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("the KV pool needs at least one block")
        self.count = count
        self._free = list(range(count - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.count - len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"{n} KV blocks wanted, {len(self._free)} free")
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return taken[::-1]

    def give_back(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass(eq=False)
class SequenceBlocks:
    """One sequence's block table and how many of its positions hold keys and values."""

    block_size: int
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # positions filled (committed after each step)

    def missing(self, length: int) -> int:
        """Blocks to add so that `length` positions fit."""
        return max(0, math.ceil(length / self.block_size) - len(self.blocks))

    def slots(self, start: int, stop: int) -> list[int]:
        """Pool slots of positions start..stop-1."""
        size = self.block_size
        return [self.blocks[p // size] * size + p % size for p in range(start, stop)]
