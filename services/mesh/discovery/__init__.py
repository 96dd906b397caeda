"""Where callers find the instances of a service: static addresses (the embedded default),
Consul, or DNS names resolved to every address (Kubernetes headless Services). The backend is
chosen here, once, from the settings."""

from __future__ import annotations

from services.mesh.config import Settings
from services.mesh.discovery.base import Discovery


def for_settings(settings: Settings) -> Discovery:
    """The discovery backend the settings name."""
    if settings.discovery == "consul":
        from services.mesh.discovery.consul import ConsulDiscovery

        return ConsulDiscovery(settings)
    if settings.discovery == "dns":
        from services.mesh.discovery.dns import DnsDiscovery

        return DnsDiscovery(settings)
    from services.mesh.discovery.static import StaticDiscovery

    return StaticDiscovery.from_settings(settings)
