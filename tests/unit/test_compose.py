"""compose/ cannot run here (no Docker engine), so check it against the code it deploys."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import yaml

from services.cli import _parser
from services.mesh.config import ENV_PREFIX, Settings
from services.mesh.telemetry import ENDPOINT_VARIABLES, SERVICE_NAME_VARIABLE
from services.up import INFERENCE_ENVIRONMENT

COMPOSE = Path(__file__).resolve().parents[2] / "compose" / "docker-compose.yml"


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _sluice() -> dict[str, str]:
    """Container name → the Sluice service it runs (`sluice serve <service>`)."""
    return {name: body["command"][1] for name, body in _services().items() if body.get("command", [""])[0] == "serve"}


def _port(container: str, flag: str) -> str:
    command = _services()[container]["command"]
    return command[command.index(flag) + 1]


def test_every_sluice_service_runs_and_inference_has_two_replicas() -> None:
    assert sorted(_sluice().values()) == ["cache", "edge", "inference", "inference", "preprocess"]


def test_every_environment_variable_is_a_setting_or_read_by_telemetry() -> None:
    for name in _sluice():
        service = _services()[name]
        for key in service["environment"]:
            if key.startswith("OTEL_"):
                assert key in (*ENDPOINT_VARIABLES, SERVICE_NAME_VARIABLE), f"{name}: {key}"
                continue
            if key in INFERENCE_ENVIRONMENT:  # the inference process's environment, as `sluice up` sets it
                assert service["environment"][key] == INFERENCE_ENVIRONMENT[key] and _sluice()[name] == "inference"
                continue
            assert key.startswith(ENV_PREFIX), f"{name}: {key}"
            assert key.removeprefix(ENV_PREFIX).lower() in Settings.model_fields, f"{name}: unknown setting {key}"


def test_every_service_command_is_a_valid_sluice_command() -> None:
    for name, service in _sluice().items():
        args = _parser().parse_args(_services()[name]["command"])
        assert (args.command, args.service) == ("serve", service)


def test_every_service_traces_to_jaeger_under_its_service_name() -> None:
    services = _services()
    jaeger_grpc = next(arg for arg in services["jaeger"]["command"] if "otlp.protocols.grpc" in arg)
    for name, service in _sluice().items():
        env = services[name]["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://jaeger:{jaeger_grpc.rsplit(':', 1)[1]}"
        assert env["OTEL_SERVICE_NAME"] == f"sluice-{service}"


def test_prometheus_scrapes_every_service_where_it_serves_metrics() -> None:
    services = _services()
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    config = yaml.safe_load((COMPOSE.parent / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    expected = {
        f"{name}:{_port(name, '--edge-port' if svc == 'edge' else '--metrics-port')}" for name, svc in _sluice().items()
    }
    assert targets == expected


def test_services_register_in_consul_where_others_reach_them_and_certificates_name_them() -> None:
    services = _services()
    setup = " ".join(services["setup"]["command"])
    hostnames = {part.split()[0] for part in setup.split("--hostname ")[1:]}
    consul_port = services["consul"]["ports"][0].split(":")[1]
    assert "consul" in hostnames  # the agent's own identity for its mTLS health checks
    assert "./consul.hcl:/consul/sluice.hcl:ro" in services["consul"]["volumes"]
    for name in _sluice():
        env = services[name]["environment"]
        assert env["SLUICE_DISCOVERY"] == "consul"
        assert env["SLUICE_CONSUL_ADDR"] == f"consul:{consul_port}"
        assert env["SLUICE_ADVERTISE_HOST"] == name
        assert name in hostnames, f"{name} is registered under a name its certificate lacks"


def test_cache_shares_redis_and_static_addresses_list_every_replica() -> None:
    services = _services()
    cache_env = services["cache"]["environment"]
    assert cache_env["SLUICE_CACHE_BACKEND"] == "redis"
    assert urlparse(cache_env["SLUICE_REDIS_URL"]).hostname in services
    edge_env = services["edge"]["environment"]
    for service in ("preprocess", "inference", "cache"):
        replicas = [name for name, svc in _sluice().items() if svc == service]
        port_flag = f"--{service}-port"
        assert edge_env[f"SLUICE_{service.upper()}_ADDR"] == ",".join(f"{r}:{_port(r, port_flag)}" for r in replicas)


def test_envoy_runs_the_config_setup_generates_for_the_edge() -> None:
    services = _services()
    setup = " ".join(services["setup"]["command"])
    generate = setup[setup.index("sluice envoy-config") :].split("&&")[0].split()
    args = _parser().parse_args(generate[1:])
    assert args.edge_addr == f"edge:{_port('edge', '--edge-port')}"
    envoy = services["envoy"]
    config = envoy["command"][envoy["command"].index("--config-path") + 1]
    assert args.out == Path(config)
    assert f"{args.envoy_port}:{args.envoy_port}" in envoy["ports"]
    assert args.host == "0.0.0.0"  # reachable from outside the container


def test_grafana_is_provisioned_with_the_dashboard_and_prometheus() -> None:
    grafana = _services()["grafana"]
    mounts = {target: COMPOSE.parent / source for source, target, _ in (v.split(":") for v in grafana["volumes"])}
    dashboard = json.loads(mounts["/var/lib/grafana/dashboards/sluice.json"].read_text())
    assert dashboard["uid"] == "sluice-mesh" and dashboard["panels"]
    providers = yaml.safe_load(mounts["/etc/grafana/provisioning/dashboards/sluice.yml"].read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"
    (source,) = yaml.safe_load(mounts["/etc/grafana/provisioning/datasources/sluice.yml"].read_text())["datasources"]
    prometheus_port = _services()["prometheus"]["ports"][0].split(":")[1]
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{prometheus_port}"
