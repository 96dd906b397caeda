"""`sluice health SERVICE`: is this service SERVING? For probes that cannot speak mTLS themselves.

The kubelet's gRPC probe cannot present a client certificate, and every Sluice gRPC port
requires one. So a Kubernetes exec probe runs this command inside the pod: it connects to the
service over mTLS with the service's own certificate (a service may check its own health; see
peer_auth.py) and turns grpc.health.v1's answer into an exit code. No port is opened without
mTLS for the sake of probes.
"""

from __future__ import annotations

import enum
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.mesh.config import Settings
from services.mesh.rpc.channels import sync_channel

log = logging.getLogger(__name__)


class ProbeResult(enum.IntEnum):
    """The command's exit code."""

    SERVING = 0
    NOT_SERVING = 1  # it answers, and says it cannot take work (draining, hung engine, starting)
    UNREACHABLE = 2  # no answer within the deadline, refused, or not allowed


def probe(settings: Settings, service: str, address: str, timeout_s: float) -> ProbeResult:
    channel = sync_channel(settings, address, service)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except grpc.RpcError as err:
        log.error("%s at %s: %s (%s)", service, address, err.code().name, err.details())
        return ProbeResult.UNREACHABLE
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        log.error("%s at %s is %s", service, address, status)
        return ProbeResult.NOT_SERVING
    log.info("%s at %s is SERVING", service, address)
    return ProbeResult.SERVING
