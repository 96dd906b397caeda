"""DNS discovery against a real DNS server on loopback (dnslib's): pods appearing and
disappearing behind a headless-Service-like name move the pool, an unresolvable name is a clear
error that keeps the last good pool, and an instance found by IP is verified by its name."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from dns_standin import Zone, dns_zone
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from meshproc import wait_for

from services.mesh.config import Settings
from services.mesh.discovery.base import Instance
from services.mesh.discovery.dns import DnsDiscovery
from services.mesh.rpc.certs import init_certs
from services.mesh.rpc.channels import aio_channel
from services.mesh.rpc.tls import server_credentials

NAME = "sluice-inference.sluice.svc.cluster.local"


@pytest.fixture
def zone() -> Iterator[tuple[Zone, str]]:
    with dns_zone() as served:
        yield served, served.server


def _settings(server: str, **addresses: str) -> Settings:
    names = {"preprocess_addr": "preprocess.test:50051", "cache_addr": "cache.test:50053", **addresses}
    return Settings(discovery="dns", dns_server=server, dns_refresh_s=0.05, inference_addr=f"{NAME}:50052", **names)


def test_pods_appearing_and_disappearing_move_the_pool(zone) -> None:
    records, server = zone
    records.names[NAME] = ["10.1.0.7", "10.1.0.5"]
    discovery = DnsDiscovery(_settings(server))
    seen: list[list[str]] = []
    changed = threading.Event()

    def on_change(instances: list[Instance]) -> None:
        seen.append([i.address for i in instances])
        assert all(i.tls_name == NAME for i in instances)
        changed.set()

    discovery.watch("inference", on_change)
    try:
        assert wait_for(lambda: seen == [["10.1.0.5:50052", "10.1.0.7:50052"]], timeout=5), seen
        records.names[NAME] = ["10.1.0.7", "10.1.0.9", "fd00::3"]  # one pod gone, two new (one IPv6)
        assert wait_for(lambda: seen[-1] == ["10.1.0.7:50052", "10.1.0.9:50052", "[fd00::3]:50052"], timeout=5), seen
        count = len(seen)
        assert not wait_for(lambda: len(seen) > count, timeout=0.3), "an unchanged answer was reported again"
    finally:
        discovery.close()


def test_an_unresolvable_name_is_a_clear_error_and_keeps_the_last_pool(zone, caplog) -> None:
    records, server = zone
    records.names[NAME] = ["10.1.0.5"]
    discovery = DnsDiscovery(_settings(server))
    seen: list[list[str]] = []
    discovery.watch("inference", lambda instances: seen.append([i.address for i in instances]))
    try:
        assert wait_for(lambda: seen == [["10.1.0.5:50052"]], timeout=5)
        with caplog.at_level(logging.ERROR, logger="services.mesh.discovery.dns"):
            del records.names[NAME]
            assert wait_for(lambda: "NXDOMAIN" in caplog.text, timeout=5)
        assert f"{NAME} does not exist in DNS (NXDOMAIN)" in caplog.text
        assert "keeping its last 1 instances" in caplog.text
        assert caplog.text.count("NXDOMAIN") == 1  # once per outage, not once per refresh
        assert seen == [["10.1.0.5:50052"]]  # the pool was never emptied
        records.names[NAME] = ["10.1.0.6"]
        assert wait_for(lambda: seen[-1] == ["10.1.0.6:50052"], timeout=5)
    finally:
        discovery.close()
    with pytest.raises(LookupError, match="does not exist"):
        DnsDiscovery(_settings(server)).instances("cache")
    with pytest.raises(LookupError, match="needs name:port for cache"):
        DnsDiscovery(_settings(server, cache_addr=""))


def test_an_instance_found_by_ip_is_verified_by_its_service_name(tmp_path: Path) -> None:
    """The certificate names the Service (as cert-manager issues it), never the pod's IP."""
    init_certs(tmp_path, hostnames=(NAME,))
    settings = Settings(certs_dir=tmp_path)
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(settings, "inference"))
    server.start()

    async def check(tls_name: str) -> bool:
        async with aio_channel(settings, f"127.0.0.1:{port}", "edge", tls_name) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            except grpc.aio.AioRpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    try:
        assert asyncio.run(check(NAME))
        assert not asyncio.run(check(""))  # by its IP alone it is refused: not in the certificate
    finally:
        server.stop(0).wait()
