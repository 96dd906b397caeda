"""DNS as the mesh's discovery: the *_addr settings name DNS names, resolved to every address.

On Kubernetes a headless Service's name resolves to the addresses of its ready pods, so the
edge finds every replica without Consul: each `name:port` entry of a service's *_addr setting
is resolved (A and AAAA records) every `dns_refresh_s` seconds, and the balancer's pool follows
the pods as they come and go (health watches and ejection work on them as on any instance).
Certificates name the Service, not the pod: each instance is verified against the name it was
found under.

A name that does not resolve (NXDOMAIN, no records, no answer) is logged as an error naming it
and the service keeps its last good pool: a DNS hiccup never empties it.
"""

from __future__ import annotations

import logging
import threading

import dns.exception
import dns.resolver

from services.mesh.config import Settings, comma_list
from services.mesh.discovery.base import UPSTREAM_SERVICES, Instance, OnChange

log = logging.getLogger(__name__)

_TIMEOUT_S = 2.0


def _split(entry: str) -> tuple[str, int]:
    name, _, port = entry.rpartition(":")
    if not name or not port.isdigit():
        raise ValueError(f"{entry!r} is not name:port")
    return name, int(port)


class DnsDiscovery:
    def __init__(self, settings: Settings) -> None:
        self._targets = {
            svc: [_split(entry) for entry in comma_list(getattr(settings, f"{svc}_addr"))] for svc in UPSTREAM_SERVICES
        }
        missing = [svc for svc, targets in self._targets.items() if not targets]
        if missing:
            raise LookupError(f"dns discovery needs name:port for {', '.join(missing)} (SLUICE_<SERVICE>_ADDR)")
        self._refresh_s = settings.dns_refresh_s
        self._resolver = dns.resolver.Resolver(configure=not settings.dns_server)
        if settings.dns_server:
            host, port = _split(settings.dns_server)
            self._resolver.nameservers = [host]
            self._resolver.port = port
        self._resolver.lifetime = _TIMEOUT_S
        self._stop = threading.Event()

    def instances(self, service: str) -> list[Instance]:
        """Every address of every name the service's setting lists; LookupError if one does not resolve."""
        found = []
        for name, port in self._targets[service]:
            addresses = self._resolve(name)
            found += [Instance(service, _join(address, port), tls_name=name) for address in addresses]
        return sorted(found, key=lambda i: i.address)

    def _resolve(self, name: str) -> list[str]:
        addresses: list[str] = []
        failures = []
        for kind in ("A", "AAAA"):
            try:
                addresses += [record.to_text() for record in self._resolver.resolve(name, kind, search=True)]
            except dns.resolver.NXDOMAIN:
                raise LookupError(f"{name} does not exist in DNS (NXDOMAIN)") from None
            except (dns.resolver.NoAnswer, dns.resolver.NoNameservers, dns.exception.Timeout) as err:
                failures.append(f"{kind}: {type(err).__name__}")
        if not addresses:
            raise LookupError(f"{name} has no address ({', '.join(failures)})")
        return addresses

    def watch(self, service: str, on_change: OnChange) -> None:
        threading.Thread(target=self._watch, args=(service, on_change), name=f"dns-{service}", daemon=True).start()

    def _watch(self, service: str, on_change: OnChange) -> None:
        last: list[Instance] | None = None
        failing = False
        while not self._stop.is_set():
            try:
                found = self.instances(service)
            except LookupError as err:
                if not failing:  # once per outage, not every refresh
                    log.error(
                        "DNS discovery of %s failed: %s; keeping its last %d instances", service, err, len(last or [])
                    )
                failing = True
            else:
                if failing:
                    log.info("DNS discovery of %s resolves again", service)
                failing = False
                if found != last:
                    last = found
                    on_change(found)
            self._stop.wait(self._refresh_s)

    def close(self) -> None:
        self._stop.set()


def _join(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
