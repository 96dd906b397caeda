"""mTLS beyond "has a certificate": validity dates, the caller's identity per service, the
server's name checked by the client, and certificate rotation without a restart."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from meshproc import REPO_ROOT, Mesh, wait_for
from scripted_inference import scripted_inference

from services.mesh.config import Settings
from services.mesh.lifecycle.ready import read_ready
from services.mesh.rpc.certs import DEFAULT_HOSTNAMES, Validity, ca_paths, issue_service_cert, load_ca, service_paths
from services.mesh.rpc.channels import sync_channel
from services.mesh.stubs import common_pb2, inference_pb2, inference_pb2_grpc

BACKENDS = ["preprocess", "inference", "cache"]
NOW = dt.datetime.now(dt.UTC)


def _identity_dir(
    mesh_certs: Path,
    tmp_path: Path,
    identity: str,
    validity: Validity | None = None,
    hostnames: tuple[str, ...] = DEFAULT_HOSTNAMES,
) -> Path:
    """A certs folder holding the mesh CA and one certificate for `identity`, issued by the real CA."""
    folder = tmp_path / f"{identity}-certs"
    folder.mkdir()
    shutil.copy(ca_paths(mesh_certs).cert, ca_paths(folder).cert)
    ca_cert, ca_key = load_ca(mesh_certs)
    issue_service_cert(folder, identity, ca_cert, ca_key, hostnames, validity)
    return folder


def _health(address: str, certs: Path, identity: str) -> int:
    with sync_channel(Settings(certs_dir=certs), address, identity) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _refusal(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


@pytest.mark.parametrize(
    "validity",
    [
        (NOW - dt.timedelta(days=30), NOW - dt.timedelta(days=1)),
        (NOW + dt.timedelta(days=1), NOW + dt.timedelta(days=30)),
    ],
    ids=["expired", "not-yet-valid"],
)
@pytest.mark.parametrize("service", BACKENDS)
def test_client_certificate_outside_its_validity_is_refused(
    mesh: Mesh, tmp_path: Path, service: str, validity: Validity
) -> None:
    certs = _identity_dir(mesh.certs_dir, tmp_path, "edge", validity)
    assert _refusal(lambda: _health(mesh.address(service), certs, "edge")) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", BACKENDS)
def test_mesh_identity_not_allowed_to_call_a_service_is_denied(mesh: Mesh, service: str) -> None:
    # A real, valid mesh certificate of a backend that never calls its peers (a service may only
    # check its own health: `sluice health`, so the caller is another backend).
    caller = "cache" if service == "preprocess" else "preprocess"
    code = _refusal(lambda: _health(mesh.address(service), mesh.certs_dir, caller))
    assert code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("service", BACKENDS)
def test_sluice_health_checks_a_running_service_with_its_own_identity(mesh: Mesh, service: str) -> None:
    probe = [sys.executable, "-m", "services.cli", "health", service, "--address", mesh.address(service)]
    done = subprocess.run([*probe, "--certs-dir", str(mesh.certs_dir)], cwd=REPO_ROOT, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()


def test_consul_may_check_health_and_nothing_else(mesh: Mesh) -> None:
    address = mesh.address("inference")
    assert _health(address, mesh.certs_dir, "consul") == health_pb2.HealthCheckResponse.SERVING
    request = inference_pb2.GenerateRequest(token_ids=[5, 6], sampling=common_pb2.SamplingParams(max_tokens=2))
    with sync_channel(Settings(certs_dir=mesh.certs_dir), address, "consul") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        code = _refusal(lambda: list(stub.Generate(request, timeout=5)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # The edge, allowed, gets tokens from the same instance.
    with sync_channel(Settings(certs_dir=mesh.certs_dir), address, "edge") as channel:
        assert list(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=30))


@pytest.fixture
def wrong_name_server(mesh: Mesh, tmp_path: Path) -> Iterator[str]:
    """A server presenting a mesh-signed inference certificate for another host name."""
    certs = _identity_dir(mesh.certs_dir, tmp_path, "inference", hostnames=("inference.elsewhere.example",))
    with scripted_inference(inference_pb2_grpc.InferenceServicer(), certs) as address:
        yield address


def test_client_refuses_a_server_certificate_for_another_name(mesh: Mesh, wrong_name_server: str) -> None:
    code = _refusal(lambda: _health(wrong_name_server, mesh.certs_dir, "edge"))
    assert code == grpc.StatusCode.UNAVAILABLE


def _served_certificate(address: str, certs: Path) -> x509.Certificate:
    """The certificate a TLS handshake on a new connection gets from the server."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca_paths(certs).cert)
    own = service_paths(certs, "edge")
    context.load_cert_chain(own.cert, own.key)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def test_replaced_certificate_files_are_served_without_a_restart(mesh: Mesh, tmp_path: Path) -> None:
    certs = tmp_path / "rotating"
    shutil.copytree(mesh.certs_dir, certs)
    ready = tmp_path / "cache.ready.json"
    env = {**os.environ, "SLUICE_CERTS_DIR": str(certs), "SLUICE_LOG_FORMAT": "text"}
    argv = [sys.executable, "-m", "services.cli", "serve", "cache", "--ready-file", str(ready)]
    process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: read_ready(ready) is not None, timeout=60), "cache never became ready"
        address = read_ready(ready).address
        before = _served_certificate(address, certs)
        assert _health(address, certs, "edge") == health_pb2.HealthCheckResponse.SERVING

        ca_cert, ca_key = load_ca(mesh.certs_dir)
        issue_service_cert(certs, "cache", ca_cert, ca_key)
        after = _served_certificate(address, certs)
        assert after.serial_number != before.serial_number
        assert after == x509.load_pem_x509_certificate(service_paths(certs, "cache").cert.read_bytes())
        # The same process, still serving mTLS gRPC on the new certificate.
        assert _health(address, certs, "edge") == health_pb2.HealthCheckResponse.SERVING
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
