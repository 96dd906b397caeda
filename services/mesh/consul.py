"""Consul as the mesh's dynamic discovery, through its HTTP API (py-consul).

Registration (every gRPC service): the instance registers as `sluice-<service>` with two
checks: a gRPC health check over TLS that the Consul agent runs against grpc.health.v1, and a
TTL check the service heartbeats itself, passing only while its own liveness probe holds (so
a hung inference engine behind a live port drops out). Draining fails the TTL check first,
then deregisters.

Discovery (the edge): one blocking query per service on /v1/health/service/<name>?passing,
re-issued with the last X-Consul-Index, so pool changes arrive within moments and idle
watches cost one long-poll each.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

import consul

from services.mesh.config import Settings
from services.mesh.discovery import Instance, OnChange

log = logging.getLogger(__name__)

SERVICE_PREFIX = "sluice-"
WATCH_WAIT = "10s"
DEREGISTER_DEAD_AFTER = "1m"


def client(settings: Settings) -> consul.Consul:
    host, _, port = settings.consul_addr.rpartition(":")
    return consul.Consul(
        host=host or "127.0.0.1",
        port=int(port),
        scheme=settings.consul_scheme,
        token=settings.consul_token or None,
        verify=settings.consul_ca or True,
    )


class ConsulRegistration:
    def __init__(
        self,
        settings: Settings,
        service: str,
        address: str,
        probe: Callable[[], bool],
        tags: tuple[str, ...] = (),
        meta: dict[str, str] | None = None,
    ) -> None:
        self._consul = client(settings)
        self._settings = settings
        self._service = service
        self._host, _, port = address.rpartition(":")
        self._port = int(port)
        self._probe = probe
        self._tags = list(tags)
        self._meta = meta or {}
        self.service_id = f"{SERVICE_PREFIX}{service}-{address}-{uuid.uuid4().hex[:8]}"
        self.ttl_check = f"{self.service_id}:ttl"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="consul-ttl", daemon=True)

    def register(self) -> None:
        interval = f"{self._settings.consul_check_interval_s:g}s"
        grpc_check = consul.Check.grpc(
            f"{self._host}:{self._port}", interval, use_tls=not self._settings.insecure, timeout="2s"
        ) | {"CheckID": f"{self.service_id}:grpc", "Name": f"{self._service} grpc.health.v1"}
        ttl_check = consul.Check.ttl(f"{3 * self._settings.consul_check_interval_s:g}s") | {
            "CheckID": self.ttl_check,
            "Name": f"{self._service} liveness heartbeat",
            # A process killed without deregistering (kill -9, a crash) leaves its entry behind;
            # its restart registers anew, so the agent reaps the dead one (Consul's minimum: 1m).
            "DeregisterCriticalServiceAfter": DEREGISTER_DEAD_AFTER,
        }
        self._consul.agent.service.register(
            f"{SERVICE_PREFIX}{self._service}",
            service_id=self.service_id,
            address=self._host,
            port=self._port,
            tags=self._tags,
            meta=self._meta,
            check=grpc_check,
            extra_checks=[ttl_check],
        )
        log.info("registered in Consul as %s", self.service_id)
        self._beat()
        self._thread.start()

    def _beat(self) -> None:
        try:
            if self._probe():
                self._consul.agent.check.ttl_pass(self.ttl_check, "serving")
            else:
                self._consul.agent.check.ttl_fail(self.ttl_check, "not making progress")
        except (consul.ConsulException, OSError) as err:
            log.warning("Consul heartbeat failed: %s", err)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self._settings.consul_check_interval_s):
            self._beat()

    def draining(self) -> None:
        """Fail the TTL check at once, so watchers drop this instance before it stops."""
        self._stop.set()
        try:
            self._consul.agent.check.ttl_fail(self.ttl_check, "draining")
        except (consul.ConsulException, OSError) as err:
            log.warning("Consul: could not mark %s draining: %s", self.service_id, err)

    def deregister(self) -> None:
        self._stop.set()
        try:
            self._consul.agent.service.deregister(self.service_id)
            log.info("deregistered %s from Consul", self.service_id)
        except (consul.ConsulException, OSError) as err:
            log.warning("Consul: could not deregister %s: %s", self.service_id, err)


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
