"""Who may call a mesh service: the peer's certificate must chain to the mesh CA (the TLS
layer checks that) and name an identity (its spiffe://sluice/<identity> URI SAN) that is
allowed to call this service. Everything else is answered PERMISSION_DENIED.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
import grpc.aio

from services.mesh.rpc.certs import spiffe_id
from services.mesh.rpc.handlers import guard_behavior

# The edge calls every backend; Envoy's internal gRPC listener forwards the edge's calls as `envoy`.
DEFAULT_CALLERS = frozenset({"edge", "envoy"})
# The Consul agent runs gRPC health checks and may do nothing else; so may a service checking its
# own health with its own certificate (`sluice health`, the Kubernetes exec probe).
HEALTH_CHECKERS = frozenset({"consul"})
_HEALTH_PREFIX = "/grpc.health.v1.Health/"


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The spiffe id of the caller's certificate, or None (plaintext, or a certificate without one)."""
    ids = context.auth_context().get("peer_spiffe_id") or ()
    return ids[0].decode() if ids else None


class PeerAuthorizer(grpc.aio.ServerInterceptor):
    def __init__(self, service: str, callers: Iterable[str] = DEFAULT_CALLERS) -> None:
        self._service = service
        self._callers = frozenset(spiffe_id(c) for c in callers)
        self._health_callers = self._callers | {spiffe_id(c) for c in (*HEALTH_CHECKERS, service)}

    def allowed(self, method: str, identity: str | None) -> bool:
        callers = self._health_callers if method.startswith(_HEALTH_PREFIX) else self._callers
        return identity in callers

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None

        async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
            identity = peer_identity(context)
            if not self.allowed(details.method, identity):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{identity or 'a caller without a mesh identity'} may not call {self._service}",
                )

        return guard_behavior(handler, check)
