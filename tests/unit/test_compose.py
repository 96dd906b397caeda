"""compose/ cannot run here (no Docker engine), so check it against the code it deploys."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.cli import _parser
from services.mesh.config import ENV_PREFIX, Settings
from services.mesh.telemetry import ENDPOINT_VARIABLES, SERVICE_NAME_VARIABLE

COMPOSE = Path(__file__).resolve().parents[2] / "compose" / "docker-compose.yml"
SLUICE = ("preprocess", "inference", "cache", "edge")


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_every_environment_variable_is_a_setting_or_read_by_telemetry() -> None:
    for name in SLUICE:
        for key in _services()[name]["environment"]:
            if key.startswith("OTEL_"):
                assert key in (*ENDPOINT_VARIABLES, SERVICE_NAME_VARIABLE), f"{name}: {key}"
                continue
            assert key.startswith(ENV_PREFIX), f"{name}: {key}"
            assert key.removeprefix(ENV_PREFIX).lower() in Settings.model_fields, f"{name}: unknown setting {key}"


def test_every_service_sends_traces_to_jaeger_under_its_own_name() -> None:
    services = _services()
    jaeger_grpc = next(arg for arg in services["jaeger"]["command"] if "otlp.protocols.grpc" in arg)
    port = jaeger_grpc.rsplit(":", 1)[1]
    names = set()
    for name in SLUICE:
        env = services[name]["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://jaeger:{port}"
        names.add(env["OTEL_SERVICE_NAME"])
    assert names == {f"sluice-{name}" for name in SLUICE}


def test_prometheus_scrapes_every_service_where_it_serves_metrics() -> None:
    services = _services()
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    config = yaml.safe_load((COMPOSE.parent / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    expected = set()
    for name in SLUICE:
        command = services[name]["command"]
        flag = "--edge-port" if name == "edge" else "--metrics-port"
        expected.add(f"{name}:{command[command.index(flag) + 1]}")
    assert targets == expected


def test_every_service_command_is_a_valid_sluice_command() -> None:
    services = _services()
    for name in SLUICE:
        args = _parser().parse_args(services[name]["command"])
        assert (args.command, args.service) == ("serve", name)


def test_edge_reaches_each_backend_on_the_port_it_serves() -> None:
    services = _services()
    edge_env = services["edge"]["environment"]
    for name in ("preprocess", "inference", "cache"):
        command = services[name]["command"]
        port = command[command.index(f"--{name}-port") + 1]
        assert edge_env[f"SLUICE_{name.upper()}_ADDR"] == f"{name}:{port}"


def test_envoy_runs_the_config_setup_generates_for_the_edge() -> None:
    services = _services()
    setup = " ".join(services["setup"]["command"])
    generate = setup[setup.index("sluice envoy-config") :].split("&&")[0].split()
    args = _parser().parse_args(generate[1:])
    edge_command = services["edge"]["command"]
    assert args.edge_addr == f"edge:{edge_command[edge_command.index('--edge-port') + 1]}"
    envoy = services["envoy"]
    config = envoy["command"][envoy["command"].index("--config-path") + 1]
    assert args.out == Path(config)
    assert f"{args.envoy_port}:{args.envoy_port}" in envoy["ports"]
    assert args.host == "0.0.0.0"  # reachable from outside the container
