"""What `/health` says: per service and per served model, how many instances are SERVING, and
whether the mesh can answer requests at all.

- `unavailable` (503): preprocess or inference has no SERVING instance, or some model has
  none (its requests would all fail), or no inference instance has said what it serves yet.
- `degraded` (200): every request can be served, but some instance is down, the cache
  included (a cache that is down means misses, never failures).
- `ok` (200): every instance is SERVING.

Pure logic: the probes' results are passed in.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

REQUIRED_SERVICES = ("preprocess", "inference")


class Status(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Probe:
    """One instance's answer to a health check."""

    service: str
    address: str
    serving: bool
    model: str | None = None  # inference: the model id it described itself with, once it has


@dataclass(frozen=True)
class Availability:
    serving: int
    instances: int

    @property
    def complete(self) -> bool:
        return self.serving == self.instances


@dataclass(frozen=True)
class Readiness:
    status: Status
    services: dict[str, Availability]
    models: dict[str, Availability]

    @property
    def http_status(self) -> int:
        return 503 if self.status is Status.UNAVAILABLE else 200


def _count(keyed: Iterable[tuple[str, bool]]) -> dict[str, Availability]:
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, serving in keyed:
        tally[key][0] += serving
        tally[key][1] += 1
    return {key: Availability(serving, total) for key, (serving, total) in sorted(tally.items())}


def readiness(services: Iterable[str], probes: list[Probe]) -> Readiness:
    """The verdict over every instance of `services` (a service with no instances counts as down)."""
    by_service = {name: Availability(0, 0) for name in services} | _count((p.service, p.serving) for p in probes)
    # An embedding model's instances never stand in for the chat model's, nor the other way round.
    models = _count((p.model, p.serving) for p in probes if p.model is not None)
    required = (by_service.get(name, Availability(0, 0)) for name in REQUIRED_SERVICES)
    if not models or any(a.serving == 0 for a in (*required, *models.values())):
        status = Status.UNAVAILABLE
    elif all(a.complete for a in (*by_service.values(), *models.values())):
        status = Status.OK
    else:
        status = Status.DEGRADED
    return Readiness(status, by_service, models)
