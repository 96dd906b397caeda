"""Development certificate authority for the mesh (`sluice certs init`).

One CA and one certificate per service. Each service certificate carries the DNS/IP
names it is reached at and a URI SAN naming the service (spiffe://sluice/<service>),
so peers can check not only the chain but also who is on the other end.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# envoy: the ingress proxy (its client-facing default and its mTLS into the mesh);
# consul: the Consul agent, for the gRPC health checks it runs over mTLS.
MESH_SERVICES = ("edge", "preprocess", "inference", "cache", "envoy", "consul")
DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1")
_VALIDITY = dt.timedelta(days=825)


@dataclass(frozen=True)
class CertPaths:
    cert: Path
    key: Path


def ca_paths(certs_dir: Path) -> CertPaths:
    return CertPaths(certs_dir / "ca.crt", certs_dir / "ca.key")


def service_paths(certs_dir: Path, service: str) -> CertPaths:
    return CertPaths(certs_dir / f"{service}.crt", certs_dir / f"{service}.key")


def spiffe_id(service: str) -> str:
    return f"spiffe://sluice/{service}"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # Create with 0600 from the start: the key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


Validity = tuple[dt.datetime, dt.datetime]


def default_validity() -> Validity:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + _VALIDITY


def _builder(
    subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, validity: Validity | None = None
) -> x509.CertificateBuilder:
    not_before, not_after = validity or default_validity()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def create_ca(
    certs_dir: Path, common_name: str = "Sluice dev CA"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(common_name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    paths = ca_paths(certs_dir)
    _write_key(paths.key, key)
    _write_cert(paths.cert, cert)
    return cert, key


def _san(hostnames: tuple[str, ...], service: str) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    names.append(x509.UniformResourceIdentifier(spiffe_id(service)))
    return x509.SubjectAlternativeName(names)


def issue_service_cert(
    certs_dir: Path,
    service: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hostnames: tuple[str, ...] = DEFAULT_HOSTNAMES,
    validity: Validity | None = None,
) -> CertPaths:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(f"sluice-{service}", ca_cert.subject, key.public_key(), validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hostnames, service), critical=False)
        # Every service is both a server and a client of its upstreams.
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = service_paths(certs_dir, service)
    _write_key(paths.key, key)
    _write_cert(paths.cert, cert)
    return paths


def load_ca(certs_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    paths = ca_paths(certs_dir)
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{paths.key} is not an EC private key")
    return cert, key


def init_certs(
    certs_dir: Path,
    hostnames: tuple[str, ...] = DEFAULT_HOSTNAMES,
    force: bool = False,
    services: tuple[str, ...] = MESH_SERVICES,
) -> list[Path]:
    """Create the CA (unless present) and any missing service certificates; return what was written."""
    certs_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ca = ca_paths(certs_dir)
    if force or not (ca.cert.exists() and ca.key.exists()):
        ca_cert, ca_key = create_ca(certs_dir)
        written += [ca.cert, ca.key]
        force = True  # a new CA invalidates every service certificate
    else:
        ca_cert, ca_key = load_ca(certs_dir)
    for service in services:
        paths = service_paths(certs_dir, service)
        if force or not (paths.cert.exists() and paths.key.exists()):
            issue_service_cert(certs_dir, service, ca_cert, ca_key, hostnames)
            written += [paths.cert, paths.key]
    return written


def certs_present(certs_dir: Path, services: tuple[str, ...] = MESH_SERVICES) -> bool:
    # The CA key is only needed to issue certificates, not to run; it may live elsewhere.
    paths = [service_paths(certs_dir, s) for s in services]
    return ca_paths(certs_dir).cert.exists() and all(p.cert.exists() and p.key.exists() for p in paths)
