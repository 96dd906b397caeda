"""A scripted inference service for tests: real gRPC over the mesh's mTLS with grpc.health.v1,
answering with whatever servicer a test scripts (behaviour the default model cannot show)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from services.mesh.config import Settings
from services.mesh.stubs import inference_pb2_grpc
from services.mesh.tls import server_credentials


@contextmanager
def scripted_inference(servicer: inference_pb2_grpc.InferenceServicer, certs_dir: Path) -> Iterator[str]:
    """Serve `servicer` as the `inference` identity on a free port; yields host:port."""
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(Settings(certs_dir=certs_dir), "inference"))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)
