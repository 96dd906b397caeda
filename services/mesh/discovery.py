"""Where the edge finds its upstream services. Static addresses are the embedded default."""

from __future__ import annotations

from services.mesh.config import Settings

UPSTREAM_SERVICES = ("preprocess", "inference", "cache")


class StaticDiscovery:
    """Fixed host:port per service, from configuration."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self._addresses = addresses

    @classmethod
    def from_settings(cls, settings: Settings) -> StaticDiscovery:
        return cls({svc: getattr(settings, f"{svc}_addr") for svc in UPSTREAM_SERVICES})

    def address(self, service: str) -> str:
        address = self._addresses.get(service)
        if not address:
            raise LookupError(f"no address for {service}: set SLUICE_{service.upper()}_ADDR or use `sluice up`")
        return address
