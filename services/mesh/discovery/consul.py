"""Consul as the mesh's dynamic discovery, through its HTTP API (py-consul): one blocking query
per service on /v1/health/service/<name>?passing, re-issued with the last X-Consul-Index, so pool
changes arrive within moments and idle watches cost one long-poll each. (Services register
themselves: lifecycle/registration.py.)
"""

from __future__ import annotations

import logging
import threading

import consul

from services.mesh.config import Settings
from services.mesh.discovery.base import Instance, OnChange

log = logging.getLogger(__name__)

SERVICE_PREFIX = "sluice-"
WATCH_WAIT = "10s"


def client(settings: Settings) -> consul.Consul:
    host, _, port = settings.consul_addr.rpartition(":")
    return consul.Consul(
        host=host or "127.0.0.1",
        port=int(port),
        scheme=settings.consul_scheme,
        token=settings.consul_token or None,
        verify=settings.consul_ca or True,
    )


class ConsulDiscovery:
    """Passing instances of each watched service, pushed to a callback whenever they change."""

    def __init__(self, settings: Settings, retry_s: float = 1.0) -> None:
        self._consul = client(settings)
        self._retry_s = retry_s
        self._stop = threading.Event()

    def instances(self, service: str, index: str | None = None) -> tuple[str, list[Instance]]:
        index, entries = self._consul.health.service(
            f"{SERVICE_PREFIX}{service}", passing=True, index=index, wait=WATCH_WAIT
        )
        found = [
            Instance(
                service,
                f"{e['Service']['Address']}:{e['Service']['Port']}",
                e["Service"]["ID"],
                tuple(e["Service"].get("Tags") or ()),
            )
            for e in entries
        ]
        return index, found

    def watch(self, service: str, on_change: OnChange) -> None:
        threading.Thread(target=self._watch, args=(service, on_change), name=f"consul-{service}", daemon=True).start()

    def _watch(self, service: str, on_change: OnChange) -> None:
        index, last = None, None
        while not self._stop.is_set():
            try:
                index, found = self.instances(service, index)
            except (consul.ConsulException, OSError) as err:
                # Keep the pool as it is: a Consul outage must not empty it.
                log.warning("Consul watch of %s failed (%s); retrying", service, err)
                index = None
                self._stop.wait(self._retry_s)
                continue
            if found != last:
                last = found
                on_change(found)

    def close(self) -> None:
        self._stop.set()
