"""Client-side load balancing logic, without a network (channels are plain objects here)."""

from __future__ import annotations

import pytest

from services.edge_http.core.balancer import NoInstance, Pool
from services.mesh.discovery.base import Instance


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _pool(*addresses: str, clock: Clock | None = None, ejected: list | None = None) -> Pool:
    pool = Pool(
        "inference",
        lambda instance: f"channel to {instance.address}",
        eject_after=3,
        cooldown_s=10,
        on_eject=(ejected if ejected is not None else []).append,
        clock=clock or Clock(),
    )
    pool.update([Instance("inference", a) for a in addresses])
    return pool


def test_least_outstanding_wins_and_ties_take_turns() -> None:
    pool = _pool("a:1", "b:1", "c:1")
    first = pool.pick()
    pool.started(first)
    second = pool.pick()
    assert second is not first
    pool.started(second)
    third = pool.pick()
    assert third not in (first, second)
    pool.started(third)
    pool.finished(first, False)
    assert pool.pick() is first  # the only idle one again
    # With all idle, successive picks rotate over every instance.
    for endpoint in (second, third):
        pool.finished(endpoint, False)
    assert {pool.pick().instance.address for _ in range(3)} == {"a:1", "b:1", "c:1"}


def test_consecutive_instance_failures_eject_until_the_cool_down_ends() -> None:
    clock, ejected = Clock(), []
    pool = _pool("a:1", "b:1", clock=clock, ejected=ejected)
    bad = next(e for e in pool.endpoints if e.instance.address == "a:1")
    for fault in (True, False, True):
        pool.started(bad)
        pool.finished(bad, fault)
    assert not ejected  # a call the instance answered resets the count: 1 + 1 faults, not 2 in a row
    for _ in range(3):
        pool.started(bad)
        pool.finished(bad, True)
    assert ejected == [bad]
    assert {pool.pick().instance.address for _ in range(4)} == {"b:1"}
    clock.now += 10.1
    assert {pool.pick().instance.address for _ in range(4)} == {"a:1", "b:1"}  # re-admitted


def test_everything_out_still_answers_with_the_least_bad_instance() -> None:
    pool = _pool("a:1", "b:1")
    a, b = sorted(pool.endpoints, key=lambda e: e.instance.address)
    a.healthy = False
    b.ejected_until = 200.0  # ejected, but healthy: preferred over an unhealthy one
    assert pool.pick() is b
    assert pool.pick(exclude=["b:1"]) is a
    with pytest.raises(NoInstance):
        pool.pick(exclude=["a:1", "b:1"])
    assert pool.alternatives(["a:1"]) and not pool.alternatives(["a:1", "b:1"])


def test_updates_keep_known_instances_and_retire_removed_channels() -> None:
    pool = _pool("a:1", "b:1")
    a = next(e for e in pool.endpoints if e.instance.address == "a:1")
    a.outstanding = 2
    pool.update([Instance("inference", "a:1"), Instance("inference", "c:1")])
    assert {e.instance.address for e in pool.endpoints} == {"a:1", "c:1"}
    assert next(e for e in pool.endpoints if e.instance.address == "a:1") is a  # state kept
    assert pool.retired == ["channel to b:1"]
