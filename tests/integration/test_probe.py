"""`sluice health`, the exec probe: a real gRPC server with mTLS and the mesh's identity check,
answered SERVING → 0, NOT_SERVING → 1, unreachable or refused → 2, always within its deadline."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from loop_thread import LoopThread

from services.cli import main
from services.mesh.config import Settings
from services.mesh.rpc.peer_auth import PeerAuthorizer
from services.mesh.rpc.tls import server_credentials

Status = health_pb2.HealthCheckResponse.ServingStatus


@pytest.fixture
def inference_health(certs_dir: Path) -> Iterator[tuple[str, Callable[[Status], None]]]:
    """A server that checks callers as inference does, with only grpc.health.v1 on it; and how to
    set the health it answers."""
    settings = Settings(certs_dir=certs_dir)

    async def start() -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
        server = grpc.aio.server(interceptors=[PeerAuthorizer("inference")])
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(settings, "inference"))
        await server.start()
        return server, servicer, port

    with LoopThread() as thread:
        server, servicer, port = thread.run(start())
        try:
            yield f"127.0.0.1:{port}", lambda status: thread.run(servicer.set("", status))
        finally:
            thread.run(server.stop(0))


def _probe(certs_dir: Path, address: str, service: str = "inference", timeout: str = "2") -> tuple[int, float]:
    started = time.monotonic()
    code = main(["health", service, "--address", address, "--certs-dir", str(certs_dir), "--timeout-s", timeout])
    return code, time.monotonic() - started


def test_serving_exits_0_and_not_serving_exits_1(certs_dir: Path, inference_health) -> None:
    address, set_status = inference_health
    set_status(health_pb2.HealthCheckResponse.SERVING)
    assert _probe(certs_dir, address)[0] == 0
    set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _probe(certs_dir, address)[0] == 1


def test_unreachable_exits_2_within_the_deadline(certs_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: nothing answers
        code, took = _probe(certs_dir, address, timeout="1")
    assert code == 2 and took < 5


def test_another_services_certificate_is_refused(certs_dir: Path, inference_health) -> None:
    address, set_status = inference_health
    set_status(health_pb2.HealthCheckResponse.SERVING)
    # `sluice health preprocess` presents preprocess's certificate: inference lets only itself,
    # its callers and Consul ask.
    assert _probe(certs_dir, address, service="preprocess")[0] == 2


def test_a_port_is_required(certs_dir: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["health", "cache", "--certs-dir", str(certs_dir)])
    assert exit_.value.code == 2
