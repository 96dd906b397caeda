"""Hash chains over token blocks: a block's hash covers its tokens and every token before it.

The engine indexes computed KV blocks by these hashes (prefix caching); the edge keeps the same
chains per replica to send a prompt where its prefix was computed (prefix-aware routing). Two
prompts share the first k hashes exactly when they share their first k blocks of tokens.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes


def root_hash(salt: str) -> BlockHash:
    """The chain's start: what the tokens mean depends on the model (and its version)."""
    return hashlib.blake2b(salt.encode(), digest_size=16).digest()


def block_hashes(
    tokens: Sequence[int], block_size: int, root: BlockHash, known: Sequence[BlockHash] = ()
) -> list[BlockHash]:
    """The hash of every full block of `tokens`, reusing `known` (those of its first blocks).

    A 128-bit digest rather than Python's hash: a collision would hand one prompt another's KV."""
    hashes = list(known)
    previous = hashes[-1] if hashes else root
    for start in range(len(hashes) * block_size, len(tokens) - block_size + 1, block_size):
        block = array("q", tokens[start : start + block_size]).tobytes()
        previous = hashlib.blake2b(previous + block, digest_size=16).digest()
        hashes.append(previous)
    return hashes
