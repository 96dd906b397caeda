"""Envoy v3 bootstrap generated from Sluice's own settings, so the proxy never drifts from the mesh.

The public listener terminates TLS for clients (HTTP/1.1 and HTTP/2 by ALPN) in front of the
edge: SSE passes through unbuffered, completion routes may stream as long as the mesh's own
generation deadline, request bodies are capped, a local token bucket limits the request rate,
access logs are JSON lines, and Envoy's own error replies use the OpenAI error body. The edge
cluster is actively health-checked (`/health`) with outlier detection.

With `internal_grpc`, a second listener fronts preprocess, inference and cache: mTLS from
callers holding the mesh's edge certificate, mTLS to the services as `envoy`, HTTP/2 upstream
and grpc.health.v1 checks on every cluster.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.mesh.config import Settings, comma_list
from services.mesh.contracts.retry import RETRY_AFTER_S
from services.mesh.discovery.base import UPSTREAM_SERVICES
from services.mesh.lifecycle.ready import advertised_address
from services.mesh.rpc.certs import ca_paths, service_paths, spiffe_id

IDENTITY = "envoy"
PUBLIC_LISTENER = "openai_https"
_TYPES = "type.googleapis.com/envoy.extensions"
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
_ROUTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": f"{_TYPES}.filters.http.router.v3.Router"}}
# Envoy's own replies (no upstream, timeout, too large, rate limited) in the OpenAI error shape.
_ERROR_TYPES = {413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {text!r}")
        return cls(host.strip("[]"), int(port))

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def socket(self) -> dict[str, Any]:
        return {"socket_address": {"address": self.host, "port_value": self.port}}


@dataclass(frozen=True)
class EnvoyPlan:
    listen: Address
    admin: Address
    edge: Address
    tls_cert: Path
    tls_key: Path
    ca_cert: Path
    mesh_cert: Path  # Envoy's own mesh identity, for mTLS to and from the gRPC services
    mesh_key: Path
    stream_timeout_s: float
    unary_timeout_s: float
    max_request_bytes: int
    rate_limit_rps: int
    internal: dict[str, list[Address]] | None = None  # every replica of each gRPC service
    internal_listen: Address | None = None


def plan(settings: Settings, edge_addr: str = "", internal_grpc: bool = False) -> EnvoyPlan:
    """What Envoy needs to know, taken from the settings (and the edge's address when it is known)."""
    # Absolute paths: Envoy may run from another directory (compose, a systemd unit).
    certs_dir = settings.certs_dir.resolve()
    mesh = service_paths(certs_dir, IDENTITY)
    internal = None
    if internal_grpc:
        missing = [svc for svc in UPSTREAM_SERVICES if not getattr(settings, f"{svc}_addr")]
        if missing:
            flags = ", ".join(f"--{svc}-addr" for svc in missing)
            raise ValueError(f"--internal-grpc needs the services' addresses: set {flags}")
        internal = {
            svc: [Address.parse(a) for a in comma_list(getattr(settings, f"{svc}_addr"))] for svc in UPSTREAM_SERVICES
        }
    return EnvoyPlan(
        listen=Address(settings.listen_host, settings.envoy_port),
        admin=Address("127.0.0.1", settings.envoy_admin_port),
        edge=Address.parse(edge_addr or advertised_address(settings.listen_host, settings.edge_port)),
        tls_cert=Path(settings.envoy_tls_cert).resolve() if settings.envoy_tls_cert else mesh.cert,
        tls_key=Path(settings.envoy_tls_key).resolve() if settings.envoy_tls_key else mesh.key,
        ca_cert=ca_paths(certs_dir).cert,
        mesh_cert=mesh.cert,
        mesh_key=mesh.key,
        # A stream may last as long as the mesh lets a generation run, plus the unary hops before it.
        stream_timeout_s=settings.generate_timeout_s + 2 * settings.upstream_timeout_s,
        unary_timeout_s=settings.upstream_timeout_s + 5,
        max_request_bytes=settings.max_request_bytes,
        rate_limit_rps=settings.envoy_rate_limit_rps,
        internal=internal,
        internal_listen=Address(settings.host, settings.envoy_grpc_port) if internal else None,
    )


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _tls_certificate(cert: Path, key: Path) -> dict[str, Any]:
    return {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}


def _access_log() -> list[dict[str, Any]]:
    fields = {
        "time": "%START_TIME%",
        "service": "envoy",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "protocol": "%PROTOCOL%",
        "status": "%RESPONSE_CODE%",
        "flags": "%RESPONSE_FLAGS%",
        "bytes_in": "%BYTES_RECEIVED%",
        "bytes_out": "%BYTES_SENT%",
        "duration_ms": "%DURATION%",
        "upstream": "%UPSTREAM_HOST%",
        "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    }
    config = {"@type": f"{_TYPES}.access_loggers.stream.v3.StdoutAccessLog", "log_format": {"json_format": fields}}
    return [{"name": "envoy.access_loggers.stdout", "typed_config": config}]


def _local_replies() -> dict[str, Any]:
    def mapper(status: int, kind: str) -> dict[str, Any]:
        error = {"message": "%LOCAL_REPLY_BODY%", "type": kind, "param": None, "code": "%RESPONSE_CODE_DETAILS%"}
        out: dict[str, Any] = {
            "filter": {
                "status_code_filter": {
                    "comparison": {"op": "EQ", "value": {"default_value": status, "runtime_key": "unused"}}
                }
            },
            "body_format_override": {"json_format": {"error": error}},
        }
        if status in (429, 503):
            out["headers_to_add"] = [
                {
                    "header": {"key": "Retry-After", "value": str(RETRY_AFTER_S)},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ]
        return out

    return {"mappers": [mapper(status, kind) for status, kind in _ERROR_TYPES.items()]}


def _public_routes(p: EnvoyPlan) -> dict[str, Any]:
    # Completions stream: no cut while tokens flow, nor while a long prefill is silent.
    streaming = {
        "cluster": "sluice_edge",
        "timeout": _duration(p.stream_timeout_s),
        "idle_timeout": _duration(p.stream_timeout_s),
    }
    routes = [{"match": {"path": path}, "route": streaming} for path in COMPLETION_PATHS]
    routes.append(
        {"match": {"prefix": "/"}, "route": {"cluster": "sluice_edge", "timeout": _duration(p.unary_timeout_s)}}
    )
    return {"name": "openai", "virtual_hosts": [{"name": "sluice", "domains": ["*"], "routes": routes}]}


def _http_filters(p: EnvoyPlan) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = [
        {
            # Buffers request bodies only (small JSON): larger ones get 413 before reaching the edge.
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": f"{_TYPES}.filters.http.buffer.v3.Buffer",
                "max_request_bytes": p.max_request_bytes,
            },
        }
    ]
    if p.rate_limit_rps:
        bucket = {"max_tokens": 2 * p.rate_limit_rps, "tokens_per_fill": p.rate_limit_rps, "fill_interval": "1s"}
        everyone = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "unused"}
        filters.append(
            {
                "name": "envoy.filters.http.local_ratelimit",
                "typed_config": {
                    "@type": f"{_TYPES}.filters.http.local_ratelimit.v3.LocalRateLimit",
                    "stat_prefix": "sluice_ingress",
                    "token_bucket": bucket,
                    "filter_enabled": everyone,
                    "filter_enforced": everyone,
                },
            }
        )
    filters.append(_ROUTER)
    return filters


def _connection_manager(
    stat_prefix: str, routes: dict[str, Any], filters: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    config = {
        "@type": f"{_TYPES}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "use_remote_address": True,
        "route_config": routes,
        "http_filters": filters,
        "access_log": _access_log(),
        **extra,
    }
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def _downstream_tls(
    cert: Path, key: Path, alpn: list[str], client_ca: Path | None = None, client_ids: list[str] | None = None
) -> dict[str, Any]:
    common: dict[str, Any] = {"alpn_protocols": alpn, "tls_certificates": [_tls_certificate(cert, key)]}
    context: dict[str, Any] = {"common_tls_context": common}
    if client_ca is not None:
        validation: dict[str, Any] = {"trusted_ca": {"filename": str(client_ca)}}
        if client_ids:
            validation["match_typed_subject_alt_names"] = [
                {"san_type": "URI", "matcher": {"exact": ident}} for ident in client_ids
            ]
        common["validation_context"] = validation
        context["require_client_certificate"] = True
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": f"{_TYPES}.transport_sockets.tls.v3.DownstreamTlsContext", **context},
    }


def _public_listener(p: EnvoyPlan) -> dict[str, Any]:
    manager = _connection_manager(
        "sluice_ingress",
        _public_routes(p),
        _http_filters(p),
        local_reply_config=_local_replies(),
        http2_protocol_options={"max_concurrent_streams": 256},
        # Streams are bounded by their route; idle keep-alive connections are closed after an hour.
        common_http_protocol_options={"idle_timeout": "3600s"},
        request_headers_timeout="10s",
    )
    return {
        "name": PUBLIC_LISTENER,
        "address": p.listen.socket(),
        "filter_chains": [
            {
                "transport_socket": _downstream_tls(p.tls_cert, p.tls_key, ["h2", "http/1.1"]),
                "filters": [manager],
            }
        ],
    }


def _cluster(name: str, addresses: list[Address], **extra: Any) -> dict[str, Any]:
    endpoints = [{"endpoint": {"address": address.socket()}} for address in addresses]
    return {
        "name": name,
        "type": "STATIC" if all(a.is_ip for a in addresses) else "STRICT_DNS",
        "connect_timeout": "2s",
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
        "outlier_detection": {
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 3,
            "interval": "5s",
            "base_ejection_time": "15s",
            "max_ejection_percent": 100,
        },
        "circuit_breakers": {
            "thresholds": [{"max_connections": 4096, "max_pending_requests": 4096, "max_requests": 4096}]
        },
        **extra,
    }


def _health_check(**kind: Any) -> list[dict[str, Any]]:
    return [
        {
            "timeout": "2s",
            "interval": "3s",
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            "no_traffic_interval": "3s",
            **kind,
        }
    ]


def _internal_listener(p: EnvoyPlan) -> dict[str, Any]:
    assert p.internal is not None and p.internal_listen is not None
    routes = [
        # Deadlines are the callers' (grpc-timeout), never cut by Envoy.
        {
            "match": {"prefix": f"/sluice.v1.{svc.capitalize()}/"},
            "route": {
                "cluster": f"sluice_{svc}",
                "timeout": "0s",
                "max_stream_duration": {"grpc_timeout_header_max": "0s"},
            },
        }
        for svc in p.internal
    ]
    manager = _connection_manager(
        "sluice_mesh",
        {"name": "mesh", "virtual_hosts": [{"name": "mesh", "domains": ["*"], "routes": routes}]},
        [_ROUTER],
        codec_type="HTTP2",
    )
    # Only the edge may call the internal services, as it may without Envoy.
    tls = _downstream_tls(p.mesh_cert, p.mesh_key, ["h2"], p.ca_cert, [spiffe_id("edge")])
    return {
        "name": "mesh_grpc",
        "address": p.internal_listen.socket(),
        "filter_chains": [{"transport_socket": tls, "filters": [manager]}],
    }


def _grpc_cluster(p: EnvoyPlan, service: str, addresses: list[Address]) -> dict[str, Any]:
    tls = {
        "@type": f"{_TYPES}.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [_tls_certificate(p.mesh_cert, p.mesh_key)],
            "validation_context": {
                "trusted_ca": {"filename": str(p.ca_cert)},
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": spiffe_id(service)}}],
            },
        },
    }
    http2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": f"{_TYPES}.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return _cluster(
        f"sluice_{service}",
        addresses,
        transport_socket={"name": "envoy.transport_sockets.tls", "typed_config": tls},
        typed_extension_protocol_options=http2,
        health_checks=_health_check(grpc_health_check={"service_name": ""}),
    )


def bootstrap(p: EnvoyPlan) -> dict[str, Any]:
    listeners = [_public_listener(p)]
    clusters = [_cluster("sluice_edge", [p.edge], health_checks=_health_check(http_health_check={"path": "/health"}))]
    if p.internal:
        listeners.append(_internal_listener(p))
        clusters += [_grpc_cluster(p, svc, addresses) for svc, addresses in p.internal.items()]
    return {
        "admin": {"address": p.admin.socket()},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def render(p: EnvoyPlan) -> str:
    header = "# Generated by `sluice envoy-config` from Sluice's settings; regenerate rather than edit.\n"
    return header + yaml.safe_dump(bootstrap(p), sort_keys=False)
