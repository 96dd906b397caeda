"""OpenTelemetry tracing for every service, on only when an OTLP endpoint is configured.

Configured by OpenTelemetry's standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_INSECURE`,
`OTEL_BSP_*`, …), read by the SDK itself. Without an endpoint nothing is installed: no
interceptors, no middleware, and span calls hit the API's no-op tracer.
"""

from __future__ import annotations

import logging
import os
import time

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
SERVICE_NAME_VARIABLE = "OTEL_SERVICE_NAME"

_provider: TracerProvider | None = None


def tracing_configured() -> bool:
    return any(os.environ.get(name) for name in ENDPOINT_VARIABLES)


def service_name(service: str) -> str:
    """The name spans are reported under: OTEL_SERVICE_NAME when set, else sluice-<service>."""
    return os.environ.get(SERVICE_NAME_VARIABLE) or f"sluice-{service}"


def init_tracing(service: str) -> bool:
    """Install the SDK with a batching OTLP/gRPC exporter if an endpoint is configured; True if so."""
    global _provider
    if _provider is not None or not tracing_configured():
        return _provider is not None
    resource = Resource.create({SERVICE_NAME: service_name(service), "sluice.service": service})
    _provider = TracerProvider(resource=resource)
    # Batching keeps export off the request path; the SDK flushes at exit.
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(_provider)
    log.info("tracing on: OTLP export as %s", service_name(service))
    return True


def tracing_enabled() -> bool:
    return _provider is not None


def shutdown_tracing() -> None:
    """Export what is still buffered (a draining service's last spans) before the process exits."""
    if _provider is not None:
        _provider.shutdown()


# Only the mesh's own calls: health probes and reflection would bury requests in noise.
_TRACED_CALLS = filters.service_prefix("sluice.")


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    return [aio_server_interceptor(filter_=_TRACED_CALLS)] if tracing_enabled() else []


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    return list(aio_client_interceptors(filter_=_TRACED_CALLS)) if tracing_enabled() else []


def epoch_ns(monotonic_s: float) -> int:
    """A time.monotonic() reading as the wall-clock nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)
