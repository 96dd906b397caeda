"""Prometheus metrics of the edge (served on its own HTTP port at /metrics)."""

from prometheus_client import Counter, Histogram

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "sluice_edge_requests_total", "HTTP requests by route, model and status", ["route", "model", "status"]
)
REQUEST_DURATION = Histogram(
    "sluice_edge_request_duration_seconds",
    "Time from request to the last response byte (whole stream for SSE), by route, model and status",
    ["route", "model", "status"],
    buckets=_SECONDS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "sluice_edge_time_to_first_token_seconds",
    "Time from request to the first generated (or cached) text, as the client sees it",
    ["model"],
    buckets=_SECONDS,
)
CACHE_RESULTS = Counter("sluice_edge_cache_total", "Completion requests by cache outcome", ["result"])
UPSTREAM_ERRORS = Counter(
    "sluice_edge_upstream_errors_total",
    "Failed calls to upstream services, by service and gRPC code",
    ["service", "code"],
)
UPSTREAM_RETRIES = Counter(
    "sluice_edge_upstream_retries_total", "Calls retried on another instance after a failure", ["service"]
)
UPSTREAM_EJECTIONS = Counter(
    "sluice_edge_upstream_ejections_total", "Instances ejected from a pool after failures in a row", ["service"]
)
