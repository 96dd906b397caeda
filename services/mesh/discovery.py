"""Where callers find the instances of a service.

Static addresses (comma-separated lists, one entry per replica) are the embedded default;
Consul (services/mesh/consul.py) and DNS (dns_discovery.py: Kubernetes headless Services) are
the dynamic backends. Each hands a caller the instances to use through `watch`, so pools update
without restarts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from services.mesh.config import Settings, comma_list

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


class StaticDiscovery:
    """Fixed host:port lists per service, from configuration."""

    def __init__(self, addresses: dict[str, list[str]]) -> None:
        self._addresses = addresses

    @classmethod
    def from_settings(cls, settings: Settings) -> StaticDiscovery:
        return cls({svc: comma_list(getattr(settings, f"{svc}_addr")) for svc in UPSTREAM_SERVICES})

    def instances(self, service: str) -> list[Instance]:
        addresses = self._addresses.get(service)
        if not addresses:
            raise LookupError(f"no address for {service}: set SLUICE_{service.upper()}_ADDR or use `sluice up`")
        return [Instance(service, address) for address in addresses]

    def watch(self, service: str, on_change: OnChange) -> None:
        on_change(self.instances(service))

    def close(self) -> None:
        pass
