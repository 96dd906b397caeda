"""Static discovery, the embedded default: fixed host:port lists per service (comma-separated,
one entry per replica) from the *_addr settings."""

from __future__ import annotations

from services.mesh.config import Settings, comma_list
from services.mesh.discovery.base import UPSTREAM_SERVICES, Instance, OnChange


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
