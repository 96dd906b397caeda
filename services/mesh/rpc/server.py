"""Run one gRPC service the way every Sluice service runs: a `grpc.aio` server on one event loop.

mTLS with certificate rotation and a check of the caller's identity (or a warned plaintext),
grpc.health.v1, server reflection, a Prometheus endpoint, per-call metrics and request-id
logging, OpenTelemetry server spans when tracing is on, a ready file for the supervisor, and
draining on SIGTERM: NOT_SERVING first, in-flight calls finish within the grace period, then
exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from services.mesh.config import Settings
from services.mesh.lifecycle.ready import ReadyInfo, advertised_address, write_ready
from services.mesh.lifecycle.registration import ConsulRegistration
from services.mesh.lifecycle.signals import StopSignals
from services.mesh.rpc.call_observer import CallObserver
from services.mesh.rpc.malformed import RejectMalformed
from services.mesh.rpc.peer_auth import PeerAuthorizer
from services.mesh.rpc.service_errors import ServiceErrors
from services.mesh.rpc.tls import server_credentials, warn_if_insecure
from services.mesh.telemetry import server_interceptors, shutdown_tracing

log = logging.getLogger(__name__)

DRAIN_NOTICE_S = 1.0  # how long a draining server keeps accepting calls at least
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Allow clients' keepalive pings on long generation streams.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)


@dataclass(frozen=True)
class GrpcService:
    name: str  # mesh identity, e.g. "inference"
    service_names: Sequence[str]  # full gRPC names, e.g. "sluice.v1.Inference"
    register: Callable[[grpc.aio.Server], None]
    # Threads for the handlers' blocking work (tokenizing, store I/O, a forward pass); waiting
    # for the next token of a stream holds none.
    max_workers: int = 32
    # Liveness beyond "the port answers" (e.g. the engine makes progress); False turns health NOT_SERVING.
    live: Callable[[], bool] = lambda: True
    tags: tuple[str, ...] = ()  # discovery tags (e.g. the model served)


def serve(settings: Settings, spec: GrpcService, port: int, ready_file: Path | None) -> int:
    """Serve until SIGTERM or SIGINT, then drain; the exit status."""
    warn_if_insecure(settings)
    stop = StopSignals()
    return asyncio.run(_serve(settings, spec, port, ready_file, stop))


def _interceptors(settings: Settings, spec: GrpcService, observer: CallObserver) -> list[grpc.aio.ServerInterceptor]:
    # Tracing outermost, so the observer's log lines carry the call's trace id; the identity
    # check next, so refused calls are counted and traced too.
    interceptors = [*server_interceptors(), observer]
    if not settings.insecure:
        interceptors.append(PeerAuthorizer(spec.name))
    interceptors.append(RejectMalformed())
    interceptors.append(ServiceErrors(spec.name))  # innermost: every handler's own failures
    return interceptors


async def _serve(settings: Settings, spec: GrpcService, port: int, ready_file: Path | None, stop: StopSignals) -> int:
    # One event loop serves every call; a stream waiting for its next token holds no thread.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=spec.max_workers, thread_name_prefix=spec.name)
    )
    observer = CallObserver()
    server = grpc.aio.server(interceptors=_interceptors(settings, spec, observer), options=SERVER_OPTIONS)
    spec.register(server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = ("", *spec.service_names)  # the server as a whole, and each service on it
    await _set_health(health_servicer, names, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((*spec.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    bind = f"{settings.host}:{port}"
    if settings.insecure:
        bound = server.add_insecure_port(bind)
    else:
        bound = server.add_secure_port(bind, server_credentials(settings, spec.name))
    if not bound:
        raise OSError(f"{spec.name}: cannot bind {bind}")
    metrics_httpd, _ = start_http_server(settings.metrics_port, addr=settings.host)

    await server.start()
    address = advertised_address(settings.advertise_host or settings.host, bound)
    metrics = advertised_address(settings.host, metrics_httpd.server_port)
    log.info("%s serving on %s (metrics http://%s/metrics)", spec.name, address, metrics)
    if ready_file is not None:
        write_ready(ready_file, ReadyInfo(spec.name, address, metrics, os.getpid()))

    registration = None
    if settings.discovery == "consul":
        meta = {"pid": str(os.getpid()), "metrics": metrics}  # `sluice status` scrapes it
        registration = ConsulRegistration(settings, spec.name, address, spec.live, spec.tags, meta)
        await asyncio.to_thread(registration.register)

    serving = True
    while not await stop.wait_async(0.5):
        if spec.live() != serving:
            serving = not serving
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            await _set_health(health_servicer, names, status)
            log.log(
                logging.INFO if serving else logging.ERROR,
                "%s is %s",
                spec.name,
                "making progress again: SERVING" if serving else "not making progress: NOT_SERVING",
            )
    log.info("%s draining: NOT_SERVING, up to %.1fs for in-flight calls", spec.name, settings.drain_grace_s)
    await health_servicer.enter_graceful_shutdown()
    if registration is not None:
        await asyncio.to_thread(registration.draining)
    await _drain(server, observer, settings.drain_grace_s)
    if registration is not None:
        await asyncio.to_thread(registration.deregister)
    metrics_httpd.shutdown()
    shutdown_tracing()
    log.info("%s stopped", spec.name)
    return 0


async def _set_health(
    servicer: health.aio.HealthServicer, names: Sequence[str], status: health_pb2.HealthCheckResponse.ServingStatus
) -> None:
    for name in names:
        await servicer.set(name, status)


async def _drain(server: grpc.aio.Server, observer: CallObserver, grace_s: float) -> None:
    """Finish in-flight calls while still accepting, then stop.

    grpc's own stop(grace) refuses new calls at once, and a call that crosses its GOAWAY can
    stall the caller's aio client until the grace ends. So the server keeps accepting while
    callers learn NOT_SERVING (DRAIN_NOTICE_S) and until its own calls are done; the health
    watches still open then are cancelled by stop(0).
    """
    notice_s = min(DRAIN_NOTICE_S, grace_s)
    await asyncio.sleep(notice_s)  # a fixed notice period: callers react to NOT_SERVING within it
    if not await observer.wait_idle(grace_s - notice_s):
        log.warning("%d calls still running after the %.1fs grace period: cancelled", observer.active, grace_s)
    await server.stop(0)
