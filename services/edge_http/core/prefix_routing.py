"""Prefix-aware routing: a prompt goes to the replica that most likely holds its prefix's KV.

Each replica's prefix cache only helps prompts that reach it, and a least-busy balancer scatters
one system prompt over every replica, so each computes it again. The router remembers, per
replica, the hash chains (services/mesh/prefix_hash.py) of the prompts it sent there, and sends a
prompt to the replica whose remembered chains share the most leading blocks with it, unless that
replica is busier than its fair share (consistent hashing with bounded loads: at most
(1 + spill) times the average load, counting this request, and at least `slack` requests more
than the least busy replica, since a few more sequences in a batch cost far less than computing a
long prefix again); then to the least busy one, which from then on holds the prefix too. So a
hot prefix spreads over as many replicas as its load needs, and a cold one stays where it was
computed. A replica that is ejected or stops serving
is forgotten: its prefixes move to whichever replica takes them next.

Pure logic over balancer endpoints; no network.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Generic

from services.edge_http.core.balancer import Endpoint, Info, Pool
from services.mesh.contracts.prefix_hash import BlockHash, block_hashes, root_hash

# The router's own block size and window: independent of the engine's KV blocks (it only needs
# "same leading tokens"), and the first 2,048 tokens tell prompts apart well enough.
ROUTE_BLOCK = 16
ROUTE_WINDOW_BLOCKS = 128
_ROOT = root_hash("sluice-routing")


class PrefixRouter(Generic[Info]):
    def __init__(self, pool: Pool[Info], spill: float = 0.25, slack: int = 4, remembered: int = 100_000) -> None:
        self._pool = pool
        self._spill = spill
        self._slack = slack
        self._remembered = remembered  # block hashes kept per replica, least recently routed dropped
        self._held: dict[str, collections.OrderedDict[BlockHash, None]] = {}

    @staticmethod
    def hashes(token_ids: Sequence[int]) -> list[BlockHash]:
        """What a prompt is routed by: the hash chain of its leading full blocks."""
        return block_hashes(token_ids[: ROUTE_BLOCK * ROUTE_WINDOW_BLOCKS], ROUTE_BLOCK, _ROOT)

    def choose(self, usable: list[Endpoint[Info]], hashes: Sequence[BlockHash]) -> Endpoint[Info]:
        """The replica for a prompt with these hashes, remembered as holding them from now on."""
        loads = [e.load for e in usable]
        cap = max(math.ceil((1 + self._spill) * (sum(loads) + 1) / len(usable)), min(loads) + self._slack)
        ranked = sorted(((self._matched(e.instance.key, hashes), e) for e in usable), key=lambda m: (-m[0], m[1].load))
        owner = next((e for matched, e in ranked if matched and e.load + 1 <= cap), None)
        chosen = owner if owner is not None else self._pool.least_busy(usable)
        self._remember(chosen.instance.key, hashes)
        return chosen

    def forget(self, key: str) -> None:
        """The replica lost what it held (ejected, restarted, gone)."""
        self._held.pop(key, None)

    def _matched(self, key: str, hashes: Sequence[BlockHash]) -> int:
        held = self._held.get(key)
        count = 0
        for block_hash in hashes if held else ():
            if block_hash not in held:
                break
            count += 1
        return count

    def _remember(self, key: str, hashes: Sequence[BlockHash]) -> None:
        held = self._held.setdefault(key, collections.OrderedDict())
        for block_hash in hashes:
            held[block_hash] = None
            held.move_to_end(block_hash)
        while len(held) > self._remembered:
            held.popitem(last=False)
