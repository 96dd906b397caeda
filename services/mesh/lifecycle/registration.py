"""A service's registration in Consul: the instance registers as `sluice-<service>` with two
checks: a gRPC health check over TLS that the Consul agent runs against grpc.health.v1, and a
TTL check the service heartbeats itself, passing only while its own liveness probe holds (so
a hung inference engine behind a live port drops out). Draining fails the TTL check first,
then deregisters.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

import consul

from services.mesh.config import Settings
from services.mesh.discovery.consul import SERVICE_PREFIX, client

log = logging.getLogger(__name__)

DEREGISTER_DEAD_AFTER = "1m"


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
