"""Client channels to other services: mTLS unless the mesh runs --insecure."""

from __future__ import annotations

import grpc
import grpc.aio

from services.mesh.config import Settings
from services.mesh.rpc.tls import channel_credentials
from services.mesh.telemetry import client_interceptors

# Generation streams can be long; keepalives notice a dead peer instead of hanging.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # An instance that restarts on its address is found again within about a second, not after
    # grpc's default backoff (1 s, growing to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def aio_channel(settings: Settings, target: str, identity: str, tls_name: str = "") -> grpc.aio.Channel:
    """`tls_name`: the name the server's certificate must carry, when `target` is an address it
    was found at (a pod IP behind a DNS name) rather than that name."""
    # With tracing on, every call carries the W3C trace context in its metadata.
    interceptors = client_interceptors()
    if settings.insecure:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)
    options = (*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", tls_name)) if tls_name else CHANNEL_OPTIONS
    return grpc.aio.secure_channel(
        target, channel_credentials(settings, identity), options=options, interceptors=interceptors
    )


def sync_channel(settings: Settings, target: str, identity: str) -> grpc.Channel:
    if settings.insecure:
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(target, channel_credentials(settings, identity), options=CHANNEL_OPTIONS)
