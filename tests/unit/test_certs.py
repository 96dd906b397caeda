from __future__ import annotations

import stat
from pathlib import Path

from cryptography import x509

from services.mesh.rpc.certs import MESH_SERVICES, ca_paths, certs_present, init_certs, service_paths, spiffe_id


def test_init_writes_ca_and_one_cert_per_service_with_private_keys(tmp_path: Path) -> None:
    written = init_certs(tmp_path)
    assert certs_present(tmp_path)
    assert len(written) == 2 * (1 + len(MESH_SERVICES))
    for path in written:
        if path.suffix == ".key":
            assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_service_certs_chain_to_the_ca_and_name_the_service(tmp_path: Path) -> None:
    init_certs(tmp_path, hostnames=("localhost", "127.0.0.1", "gpu-7.internal"))
    ca = x509.load_pem_x509_certificate(ca_paths(tmp_path).cert.read_bytes())
    for service in MESH_SERVICES:
        cert = x509.load_pem_x509_certificate(service_paths(tmp_path, service).cert.read_bytes())
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["localhost", "gpu-7.internal"]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id(service)]


def test_init_keeps_existing_material_unless_forced(tmp_path: Path) -> None:
    init_certs(tmp_path)
    before = ca_paths(tmp_path).cert.read_bytes()
    assert init_certs(tmp_path) == []
    assert ca_paths(tmp_path).cert.read_bytes() == before
    assert init_certs(tmp_path, force=True)
    assert ca_paths(tmp_path).cert.read_bytes() != before


def test_a_missing_service_cert_is_issued_by_the_existing_ca(tmp_path: Path) -> None:
    init_certs(tmp_path)
    service_paths(tmp_path, "cache").cert.unlink()
    assert init_certs(tmp_path) == [service_paths(tmp_path, "cache").cert, service_paths(tmp_path, "cache").key]
