"""The gRPC side of the mesh: mTLS refuses strangers; health, reflection and INVALID_ARGUMENT on bad input."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from meshproc import Mesh

from services.mesh.rpc.certs import ca_paths, init_certs, service_paths
from services.mesh.stubs import cache_pb2, cache_pb2_grpc, common_pb2, preprocess_pb2, preprocess_pb2_grpc

BACKENDS = ["preprocess", "inference", "cache"]


def _credentials(certs_dir: Path, trusted_ca: Path, identity: str | None) -> grpc.ChannelCredentials:
    if identity is None:
        return grpc.ssl_channel_credentials(root_certificates=trusted_ca.read_bytes())
    own = service_paths(certs_dir, identity)
    return grpc.ssl_channel_credentials(
        root_certificates=trusted_ca.read_bytes(),
        private_key=own.key.read_bytes(),
        certificate_chain=own.cert.read_bytes(),
    )


def _health(address: str, credentials: grpc.ChannelCredentials | None) -> health_pb2.HealthCheckResponse:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


@pytest.fixture(scope="module")
def foreign_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete, valid set of certificates from a CA the mesh has never heard of."""
    path = tmp_path_factory.mktemp("foreign-certs")
    init_certs(path)
    return path


@pytest.mark.parametrize("service", BACKENDS)
def test_mesh_certificate_is_accepted(mesh: Mesh, service: str) -> None:
    creds = _credentials(mesh.certs_dir, ca_paths(mesh.certs_dir).cert, "edge")
    assert _health(mesh.address(service), creds).status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", BACKENDS)
def test_client_without_certificate_is_refused(mesh: Mesh, service: str) -> None:
    creds = _credentials(mesh.certs_dir, ca_paths(mesh.certs_dir).cert, None)
    with pytest.raises(grpc.RpcError) as caught:
        _health(mesh.address(service), creds)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", BACKENDS)
def test_certificate_from_another_ca_is_refused(mesh: Mesh, foreign_certs: Path, service: str) -> None:
    # The client trusts the real CA (so it would accept the server) but presents a foreign identity.
    creds = _credentials(foreign_certs, ca_paths(mesh.certs_dir).cert, "edge")
    with pytest.raises(grpc.RpcError) as caught:
        _health(mesh.address(service), creds)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", BACKENDS)
def test_plaintext_client_is_refused(mesh: Mesh, service: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _health(mesh.address(service), None)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def edge_channel(mesh: Mesh):
    def open_channel(service: str) -> grpc.Channel:
        return grpc.secure_channel(
            mesh.address(service), _credentials(mesh.certs_dir, ca_paths(mesh.certs_dir).cert, "edge")
        )

    return open_channel


@pytest.mark.parametrize(
    ("service", "full_name"),
    [("preprocess", "sluice.v1.Preprocess"), ("inference", "sluice.v1.Inference"), ("cache", "sluice.v1.Cache")],
)
def test_every_service_serves_reflection(edge_channel, service: str, full_name: str) -> None:
    with edge_channel(service) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {full_name, "grpc.health.v1.Health"} <= names


def test_preprocess_rejects_an_empty_prompt_with_invalid_argument(edge_channel) -> None:
    with edge_channel("preprocess") as channel:
        stub = preprocess_pb2_grpc.PreprocessStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Tokenize(
                preprocess_pb2.TokenizeRequest(model="sluice-tiny", prompt="", sampling=common_pb2.SamplingParams()),
                timeout=5,
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cache_lookup_miss_is_not_found(edge_channel) -> None:
    with edge_channel("cache") as channel, pytest.raises(grpc.RpcError) as caught:
        cache_pb2_grpc.CacheStub(channel).Lookup(cache_pb2.LookupRequest(cache_key="nope"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("service", "method"),
    [
        ("preprocess", "/sluice.v1.Preprocess/Tokenize"),
        ("preprocess", "/sluice.v1.Preprocess/RenderChat"),
        ("inference", "/sluice.v1.Inference/Generate"),
        ("cache", "/sluice.v1.Cache/Lookup"),
        ("cache", "/sluice.v1.Cache/Store"),
    ],
)
def test_malformed_request_bytes_are_invalid_argument_and_harmless(edge_channel, service: str, method: str) -> None:
    # Field 1 announced as a 100-byte string with 3 bytes behind it: not a protobuf message.
    garbage = b"\x0a\x64abc"
    with edge_channel(service) as channel:
        if method.endswith("Generate"):
            call = channel.unary_stream(method)
            attempt = lambda: list(call(garbage, timeout=5))  # noqa: E731
        else:
            attempt = lambda: channel.unary_unary(method)(garbage, timeout=5)  # noqa: E731
        with pytest.raises(grpc.RpcError) as caught:
            attempt()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert method in caught.value.details()
        # The service is unharmed: it still answers its health check on the same channel.
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
