"""Prefix-aware routing over a balancer pool, without a network: the same prefix goes to the same
replica, moves when that replica is ejected or forgotten, and spreads when it is hot."""

from __future__ import annotations

from collections import Counter

from services.edge_http.core.balancer import Endpoint, Pool, ReportedLoad
from services.edge_http.core.prefix_routing import ROUTE_BLOCK, PrefixRouter
from services.mesh.discovery.base import Instance


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def _setup(replicas: int = 3) -> tuple[Pool, PrefixRouter, Clock]:
    clock = Clock()
    pool: Pool = Pool("inference", lambda instance: instance.address, eject_after=1, cooldown_s=10, clock=clock)
    pool.update([Instance("inference", f"r{i}:1") for i in range(replicas)])
    return pool, PrefixRouter(pool), clock


def _prompt(system: int, question: int) -> list[int]:
    """A system prompt of 40 blocks shared by its questions, then the question."""
    return [1000 + system] * (40 * ROUTE_BLOCK) + [question] * 20


def _send(pool: Pool, router: PrefixRouter, prompt: list[int], exclude: tuple[str, ...] = ()) -> Endpoint:
    hashes = router.hashes(prompt)
    return pool.pick(exclude, choose=lambda usable: router.choose(usable, hashes))


def test_the_same_prefix_goes_to_the_same_replica_and_different_ones_spread() -> None:
    pool, router, _ = _setup()
    owners = {}
    for question in range(4):
        for system in range(6):
            chosen = _send(pool, router, _prompt(system, question)).instance.key
            assert owners.setdefault(system, chosen) == chosen, f"system prompt {system} moved"
    # Idle replicas take new prefixes in turn: six prefixes over three replicas, two each.
    assert sorted(Counter(owners.values()).values()) == [2, 2, 2]


def test_the_longest_shared_prefix_wins() -> None:
    pool, router, _ = _setup(2)
    short = [7] * (4 * ROUTE_BLOCK)
    first = _send(pool, router, short + [1] * 200)
    other = _send(pool, router, [9] * 200)
    assert other is not first
    # Shares only 4 blocks with `first`, but 12 with what went to `other`.
    assert _send(pool, router, [9] * (12 * ROUTE_BLOCK) + [3] * 50) is other
    assert _send(pool, router, short + [1] * 100) is first


def test_an_ejected_replicas_prefixes_move_and_it_is_forgotten() -> None:
    pool, router, clock = _setup(2)
    prompt = _prompt(0, 0)
    owner = _send(pool, router, prompt)
    pool.started(owner)
    pool.finished(owner, fault=True)  # eject_after=1: ejected
    moved = _send(pool, router, prompt)
    assert moved is not owner
    router.forget(owner.instance.key)  # what the edge does on ejection
    clock.now += 11  # the ejection has ended: both usable again
    assert all(_send(pool, router, _prompt(0, q)) is moved for q in range(5))


def test_a_hot_prefix_spreads_over_replicas_when_its_owner_is_busy() -> None:
    pool, router, _ = _setup(3)
    in_flight = []
    for question in range(12):
        endpoint = _send(pool, router, _prompt(0, question))
        pool.started(endpoint)  # none of them finishes: the load builds up
        in_flight.append(endpoint.instance.key)
    spread = Counter(in_flight)
    # The owner takes a few more than the others before the prefix spreads: then all three share it.
    assert in_flight[:4] == [in_flight[0]] * 4
    assert sorted(spread.values()) == [4, 4, 4], spread
    # Once the load is gone, the prefix's first owner (the least recently busy among equals) serves it again.
    for key in in_flight:
        pool.finished(next(e for e in pool.endpoints if e.instance.key == key), fault=False)
    assert _send(pool, router, _prompt(0, 99)).instance.key in spread


def test_reported_load_from_other_callers_counts() -> None:
    pool, router, _ = _setup(2)
    owner = _send(pool, router, _prompt(0, 0))
    owner.reported = ReportedLoad(waiting=6, running=8, kv_blocks_free=0, kv_blocks_total=100)
    other = _send(pool, router, _prompt(0, 1))
    assert other is not owner
    # Both hold the prefix now: the one with less reported load gets it.
    owner.reported = ReportedLoad(waiting=0, running=1, kv_blocks_free=90, kv_blocks_total=100)
    other.reported = ReportedLoad(waiting=0, running=5, kv_blocks_free=50, kv_blocks_total=100)
    assert _send(pool, router, _prompt(0, 2)) is owner
