"""What every discovery backend hands its caller: the instances of a service, through `watch`,
now and whenever they change, so pools update without restarts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

UPSTREAM_SERVICES = ("preprocess", "inference", "cache")


@dataclass(frozen=True)
class Instance:
    service: str
    address: str  # host:port
    id: str = ""  # unique per instance; defaults to the address
    tags: tuple[str, ...] = field(default=(), compare=False)
    tls_name: str = ""  # the name its certificate carries, when the address is not it (an IP found by DNS)

    @property
    def key(self) -> str:
        return self.id or self.address


OnChange = Callable[[list[Instance]], None]


class Discovery(Protocol):
    def watch(self, service: str, on_change: OnChange) -> None:
        """Call on_change with the service's usable instances now and whenever they change."""

    def close(self) -> None: ...
