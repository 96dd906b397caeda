"""The generated Envoy bootstrap: checked by the real Envoy binary, and for what it promises."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.ingress.envoy_config import COMPLETION_PATHS, bootstrap, plan
from services.ingress.envoy_runner import validate
from services.mesh.config import Settings

BACKENDS = {
    "preprocess_addr": "127.0.0.1:50051",
    "inference_addr": "inference:50052,inference-2:50052",  # two replicas
    "cache_addr": "[::1]:50053",
}


def _settings(certs_dir: Path, **overrides: object) -> Settings:
    return Settings(certs_dir=certs_dir, **BACKENDS, **overrides)


@pytest.mark.parametrize(
    ("internal", "rate_limit", "edge_addr"),
    list(itertools.product([False, True], [0, 50], ["", "edge:8000"])),
)
def test_envoy_accepts_every_variant(
    certs_dir: Path, tmp_path: Path, internal: bool, rate_limit: int, edge_addr: str
) -> None:
    out = tmp_path / "envoy.yaml"
    command = [sys.executable, "-m", "services.cli", "envoy-config", "--certs-dir", str(certs_dir), "--out", str(out)]
    edge = ["--edge-addr", edge_addr] if edge_addr else []
    backends = [f"--{k.replace('_', '-')}={v}" for k, v in BACKENDS.items()]
    internal_grpc = ["--internal-grpc", *backends] if internal else []
    argv = [*command, "--envoy-rate-limit-rps", str(rate_limit), *edge, *internal_grpc]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "validated by Envoy" in result.stderr
    validate(out)  # and once more directly, on the file as written


def test_a_broken_bootstrap_is_reported_with_envoys_reason(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"static_resources": {"clusters": [{"name": "x", "type": "NO_SUCH_TYPE"}]}}))
    with pytest.raises(ValueError, match="NO_SUCH_TYPE"):
        validate(config)


def test_internal_grpc_without_addresses_is_a_clear_error(certs_dir: Path) -> None:
    with pytest.raises(ValueError, match="--preprocess-addr, --inference-addr, --cache-addr"):
        plan(Settings(certs_dir=certs_dir), internal_grpc=True)


def test_public_host_moves_the_public_listener_only(certs_dir: Path) -> None:
    """--public-host opens Envoy's client listener to the network; the internal gRPC listener and
    the edge it dials stay where the mesh is."""
    planned = plan(_settings(certs_dir, public_host="0.0.0.0"), internal_grpc=True)
    assert (planned.listen.host, planned.edge.host) == ("0.0.0.0", "127.0.0.1")
    assert planned.internal_listen is not None and planned.internal_listen.host == "127.0.0.1"
    assert plan(_settings(certs_dir)).listen.host == "127.0.0.1"


def test_streams_outlive_the_generation_deadline_and_other_routes_do_not(certs_dir: Path) -> None:
    settings = _settings(certs_dir, generate_timeout_s=900, upstream_timeout_s=10)
    listener = bootstrap(plan(settings))["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = {
        r["match"].get("path", r["match"].get("prefix")): r["route"]
        for r in manager["route_config"]["virtual_hosts"][0]["routes"]
    }
    for path in COMPLETION_PATHS:
        assert float(routes[path]["timeout"].rstrip("s")) >= 900
        assert float(routes[path]["idle_timeout"].rstrip("s")) >= 900
    assert float(routes["/"]["timeout"].rstrip("s")) < 900
    # No response buffering anywhere: only the request-body buffer, the limiter and the router.
    names = [f["name"] for f in manager["http_filters"]]
    assert names == ["envoy.filters.http.buffer", "envoy.filters.http.local_ratelimit", "envoy.filters.http.router"]


def test_internal_listener_admits_only_the_edge_identity(certs_dir: Path) -> None:
    resources = bootstrap(plan(_settings(certs_dir), internal_grpc=True))["static_resources"]
    mesh = next(item for item in resources["listeners"] if item["name"] == "mesh_grpc")
    tls = mesh["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    sans = tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert sans == [{"san_type": "URI", "matcher": {"exact": "spiffe://sluice/edge"}}]
    clusters = {c["name"]: c for c in resources["clusters"]}
    assert clusters["sluice_inference"]["type"] == "STRICT_DNS"  # hostnames
    assert len(clusters["sluice_inference"]["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2
    assert clusters["sluice_cache"]["type"] == "STATIC"  # an IPv6 literal
    assert all("grpc_health_check" in clusters[f"sluice_{s}"]["health_checks"][0] for s in ("preprocess", "cache"))
