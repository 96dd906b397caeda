"""compose/ cannot run here (no Docker engine), so check it against the code it deploys."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.cli import _parser
from services.mesh.config import ENV_PREFIX, Settings

COMPOSE = Path(__file__).resolve().parents[2] / "compose" / "docker-compose.yml"


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_every_environment_variable_is_a_setting() -> None:
    for name, service in _services().items():
        for key in service.get("environment", {}):
            assert key.startswith(ENV_PREFIX), f"{name}: {key}"
            assert key.removeprefix(ENV_PREFIX).lower() in Settings.model_fields, f"{name}: unknown setting {key}"


def test_every_service_command_is_a_valid_sluice_command() -> None:
    services = _services()
    for name in ("preprocess", "inference", "cache", "edge"):
        args = _parser().parse_args(services[name]["command"])
        assert (args.command, args.service) == ("serve", name)


def test_edge_reaches_each_backend_on_the_port_it_serves() -> None:
    services = _services()
    edge_env = services["edge"]["environment"]
    for name in ("preprocess", "inference", "cache"):
        command = services[name]["command"]
        port = command[command.index(f"--{name}-port") + 1]
        assert edge_env[f"SLUICE_{name.upper()}_ADDR"] == f"{name}:{port}"
