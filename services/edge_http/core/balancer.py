"""Client-side load balancing over the instances of one service.

Picks the healthy instance with the fewest requests in flight (or lets the caller choose among
the usable ones, as prefix-aware routing does: prefix_routing.py); an instance that fails
`eject_after` calls in a row (faults of the instance: unreachable, timed out, connection lost;
never a request's own error or crash) is ejected for `cooldown_s`, then admitted again. When
every instance is ejected or unhealthy the pool still answers with the least bad one (as
Envoy's panic mode does) rather than refusing.
Pure logic: the channel factory is injected, so it is tested without a network.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from services.mesh.discovery.base import Instance

log = logging.getLogger(__name__)


class NoInstance(LookupError):
    pass


Info = TypeVar("Info")


@dataclass(frozen=True)
class ReportedLoad:
    """What an instance last said about its own load (inference's WatchLoad)."""

    waiting: int
    running: int
    kv_blocks_free: int
    kv_blocks_total: int


@dataclass
class Endpoint(Generic[Info]):
    instance: Instance
    channel: Any  # grpc.aio.Channel in production; stubs are made on it
    outstanding: int = 0
    failures: int = 0  # consecutive
    ejected_until: float = 0.0
    healthy: bool = True  # from health checks
    info: Info | None = None  # what the instance says about itself, once it has (set by the pool's owner)
    reported: ReportedLoad | None = None  # its own load report, where it sends them
    _stubs: dict[type, Any] = field(default_factory=dict)

    @property
    def load(self) -> int:
        """Requests on it: ours in flight, or all it reports (other callers' included), whichever is more."""
        reported = self.reported.waiting + self.reported.running if self.reported is not None else 0
        return max(self.outstanding, reported)

    def stub(self, stub_class: type) -> Any:
        if stub_class not in self._stubs:
            self._stubs[stub_class] = stub_class(self.channel)
        return self._stubs[stub_class]


# Picks the endpoint for a call among the usable ones (healthy, not ejected, accepted).
Choose = Callable[[list[Endpoint[Info]]], Endpoint[Info]]


class Pool(Generic[Info]):
    def __init__(
        self,
        service: str,
        make_channel: Callable[[Instance], Any],
        eject_after: int = 3,
        cooldown_s: float = 10.0,
        on_eject: Callable[[Endpoint[Info]], None] = lambda _: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self._make_channel = make_channel
        self._eject_after = eject_after
        self._cooldown_s = cooldown_s
        self._on_eject = on_eject
        self._clock = clock
        self._endpoints: dict[str, Endpoint[Info]] = {}
        self._turn = 0
        self.retired: list[Any] = []  # channels of removed instances, for the owner to close

    @property
    def endpoints(self) -> list[Endpoint[Info]]:
        return list(self._endpoints.values())

    def update(self, instances: Iterable[Instance]) -> None:
        """Make the pool hold exactly these instances, keeping the state of those it already had."""
        wanted = {instance.key: instance for instance in instances}
        for key in set(self._endpoints) - set(wanted):
            self.retired.append(self._endpoints.pop(key).channel)
        for key, instance in wanted.items():
            if key not in self._endpoints:
                self._endpoints[key] = Endpoint(instance, self._make_channel(instance))
        log.info("%s instances: %s", self.service, ", ".join(e.instance.address for e in self.endpoints) or "none")

    def renew_channels(self) -> None:
        """Open a new channel to every instance (new credentials), keeping its state; the old
        channels go to `retired` for the owner to close once their calls are done."""
        for endpoint in self._endpoints.values():
            self.retired.append(endpoint.channel)
            endpoint.channel = self._make_channel(endpoint.instance)
            endpoint._stubs.clear()

    def pick(
        self,
        exclude: Iterable[str] = (),
        accept: Callable[[Endpoint[Info]], bool] | None = None,
        choose: Choose[Info] | None = None,
    ) -> Endpoint[Info]:
        """The endpoint for the next call, among those `accept` allows (all by default): `choose`'s
        pick among the usable ones, or the least busy."""
        excluded = set(exclude)
        candidates = [e for key, e in self._endpoints.items() if key not in excluded and (accept is None or accept(e))]
        if not candidates:
            raise NoInstance(f"no {self.service} instance available")
        now = self._clock()
        usable = [e for e in candidates if e.healthy and e.ejected_until <= now]
        if usable:
            return choose(usable) if choose is not None else self.least_busy(usable)
        # Panic: everything is ejected or unhealthy; the one whose ejection ends first is the best bet.
        return min(candidates, key=lambda e: (not e.healthy, e.ejected_until, e.outstanding))

    def least_busy(self, usable: list[Endpoint[Info]]) -> Endpoint[Info]:
        fewest = min(e.load for e in usable)
        idle = [e for e in usable if e.load == fewest]
        self._turn += 1  # ties go round-robin, so equally idle instances share the load
        return idle[self._turn % len(idle)]

    def alternatives(self, tried: Iterable[str], accept: Callable[[Endpoint[Info]], bool] | None = None) -> bool:
        untried = set(self._endpoints) - set(tried)
        return any(accept is None or accept(self._endpoints[key]) for key in untried)

    def started(self, endpoint: Endpoint[Info]) -> None:
        endpoint.outstanding += 1

    def finished(self, endpoint: Endpoint[Info], fault: bool) -> None:
        """Record a call's outcome: `fault` when it failed because of the instance."""
        endpoint.outstanding -= 1
        if not fault:
            endpoint.failures = 0
            return
        endpoint.failures += 1
        if endpoint.failures >= self._eject_after and endpoint.ejected_until <= self._clock():
            endpoint.ejected_until = self._clock() + self._cooldown_s
            endpoint.failures = 0
            log.warning(
                "%s at %s ejected for %.0fs after %d failures in a row",
                self.service,
                endpoint.instance.address,
                self._cooldown_s,
                self._eject_after,
            )
            self._on_eject(endpoint)
