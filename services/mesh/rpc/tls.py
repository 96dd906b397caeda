"""mTLS credentials for servers and channels, read from the certs folder. Both follow rotation:
servers through grpc's dynamic credentials, clients by opening new channels when their own
certificate files change (CertificateWatch)."""

from __future__ import annotations

import logging

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.mesh.config import Settings
from services.mesh.rpc.certs import ca_paths, service_paths

log = logging.getLogger(__name__)

INSECURE_WARNING = "PLAINTEXT gRPC (--insecure): traffic between services is neither encrypted nor authenticated"


def _read(settings: Settings, service: str) -> tuple[bytes, bytes, bytes]:
    ca = ca_paths(settings.certs_dir).cert
    own = service_paths(settings.certs_dir, service)
    missing = [str(p) for p in (ca, own.cert, own.key) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"missing TLS material {missing}; run `sluice certs init --certs-dir {settings.certs_dir}`"
        )
    return ca.read_bytes(), own.cert.read_bytes(), own.key.read_bytes()


def _matching_pair(cert: bytes, key: bytes) -> bool:
    public = x509.load_pem_x509_certificate(cert).public_key()
    return serialization.load_pem_private_key(key, password=None).public_key() == public


class CertificateWatch:
    """Whether an identity's certificate files (its pair and the CA) were replaced since last asked.

    A half-done replacement (a new certificate beside the old key) does not count; the files are
    looked at again next time until they match.
    """

    def __init__(self, settings: Settings, identity: str) -> None:
        own = service_paths(settings.certs_dir, identity)
        self._settings, self._identity = settings, identity
        self._files = (ca_paths(settings.certs_dir).cert, own.cert, own.key)
        self._stamp = self._stamps()

    def _stamps(self) -> tuple[tuple[int, int], ...]:
        return tuple((st.st_mtime_ns, st.st_size) for st in (path.stat() for path in self._files))

    def changed(self) -> tuple[bytes, bytes, bytes] | None:
        """The new (CA, certificate, key), once, when the files changed into a matching pair."""
        try:
            stamp = self._stamps()
            if stamp == self._stamp:
                return None
            ca, cert, key = _read(self._settings, self._identity)
            if not _matching_pair(cert, key):
                return None
        except (OSError, ValueError):
            return None  # mid-replacement; keep the current certificate
        self._stamp = stamp
        log.info("%s: certificate files changed; new connections use the new certificate", self._identity)
        return ca, cert, key


class _RotatingCertificates:
    """Asked by grpc on every new connection: a new configuration once the files changed."""

    def __init__(self, settings: Settings, service: str) -> None:
        self._settings, self._service = settings, service
        self._watch = CertificateWatch(settings, service)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        ca, cert, key = _read(self._settings, self._service)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        new = self._watch.changed()
        if new is None:
            return None
        ca, cert, key = new
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def server_credentials(settings: Settings, service: str) -> grpc.ServerCredentials:
    """Server side of mTLS: present the service's certificate, require one chained to the mesh CA;
    replaced certificate files are picked up by new connections without a restart."""
    certificates = _RotatingCertificates(settings, service)
    return grpc.dynamic_ssl_server_credentials(
        certificates.initial(), certificates.fetch, require_client_authentication=True
    )


def channel_credentials(settings: Settings, identity: str) -> grpc.ChannelCredentials:
    """Client side of mTLS: trust only the mesh CA and present the caller's own certificate."""
    ca, cert, key = _read(settings, identity)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def warn_if_insecure(settings: Settings) -> None:
    if settings.insecure:
        log.warning(INSECURE_WARNING)
