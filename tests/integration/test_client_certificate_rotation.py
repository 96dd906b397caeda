"""The edge's own certificate renewed on disk (as cert-manager does) is presented on new
connections without a restart: its channels are reopened with the new files, and calls and
health stay up meanwhile. A real mTLS server records the client certificate of every call."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.edge_http.core.upstreams import Upstreams
from services.mesh.config import Settings
from services.mesh.discovery.static import StaticDiscovery
from services.mesh.rpc.certs import issue_service_cert, load_ca, service_paths
from services.mesh.rpc.handlers import UnaryRequestInterceptor, guard_behavior
from services.mesh.rpc.tls import server_credentials


class ClientSerials(UnaryRequestInterceptor):
    """Notes the serial number of the certificate each call's client presented."""

    def __init__(self) -> None:
        self.serials: list[int] = []

    def intercept(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        async def record(request: Any, context: grpc.aio.ServicerContext) -> None:
            pem = context.auth_context()["x509_pem_cert"][0]
            self.serials.append(x509.load_pem_x509_certificate(pem).serial_number)

        return guard_behavior(handler, record)


def test_a_renewed_client_certificate_is_used_without_a_restart(certs_dir: Path, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    shutil.copytree(certs_dir, certs)
    settings = Settings(certs_dir=certs)
    seen = ClientSerials()
    first = x509.load_pem_x509_certificate(service_paths(certs, "edge").cert.read_bytes()).serial_number

    async def scenario() -> tuple[list[bool], list[bool]]:
        server = grpc.aio.server(interceptors=[seen])
        servicer = health.aio.HealthServicer()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(settings, "cache"))
        await server.start()
        try:
            return await health_across_renewal(f"127.0.0.1:{port}")
        finally:
            await server.stop(0)

    async def health_across_renewal(address: str) -> tuple[list[bool], list[bool]]:
        discovery = StaticDiscovery({svc: [address] for svc in ("preprocess", "inference", "cache")})
        upstreams = Upstreams(settings, discovery)
        try:
            before = [probe.serving for probe in await upstreams.health()]
            ca_cert, ca_key = load_ca(certs)
            renewed = issue_service_cert(certs, "edge", ca_cert, ca_key)
            serial = x509.load_pem_x509_certificate(renewed.cert.read_bytes()).serial_number
            # The health watches move to the new channels first: the server sees the new certificate.
            for _ in range(100):
                if serial in seen.serials:
                    break
                await asyncio.sleep(0.1)
            after = [probe.serving for probe in await upstreams.health()]
            return before, after
        finally:
            await upstreams.close()

    before, after = asyncio.run(scenario())
    renewed = x509.load_pem_x509_certificate(service_paths(certs, "edge").cert.read_bytes()).serial_number
    assert renewed != first
    assert before == after == [True, True, True]
    assert first in seen.serials and seen.serials[-3:] == [renewed] * 3
