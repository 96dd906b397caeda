"""mTLS credentials for servers and channels, read from the certs folder."""

from __future__ import annotations

import logging

import grpc

from services.mesh.certs import ca_paths, service_paths
from services.mesh.config import Settings

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


def server_credentials(settings: Settings, service: str) -> grpc.ServerCredentials:
    """Server side of mTLS: present the service's certificate, require one chained to the mesh CA."""
    ca, cert, key = _read(settings, service)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(settings: Settings, identity: str) -> grpc.ChannelCredentials:
    """Client side of mTLS: trust only the mesh CA and present the caller's own certificate."""
    ca, cert, key = _read(settings, identity)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def warn_if_insecure(settings: Settings) -> None:
    if settings.insecure:
        log.warning(INSECURE_WARNING)
