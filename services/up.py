"""`sluice up`: the whole mesh on one machine, each service its own process.

Certificates and the default model are created on first start; internal ports are free
ones unless configured. Prints the base URL once every service is healthy, and stops
everything cleanly on Ctrl-C or SIGTERM (or when any service dies).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

from services.edge_http import keys
from services.inference.embedding_default import EmbeddingModel, resolve_embedding_model
from services.inference.manifest import MANIFEST
from services.ingress.envoy_runner import start_envoy
from services.mesh.certs import ca_paths, certs_present, init_certs
from services.mesh.channels import sync_channel
from services.mesh.config import Settings
from services.mesh.health import wait_serving
from services.mesh.ready import ReadyInfo
from services.mesh.supervisor import ChildFailed, Supervisor
from services.mesh.telemetry import SERVICE_NAME_VARIABLE

log = logging.getLogger(__name__)

DEFAULT_MODEL = Settings.model_fields["model"].default
BACKENDS = ("preprocess", "cache", "inference")


def _serve_argv(service: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "serve", service]


def _child_env(env: dict[str, str], service: str) -> dict[str, str]:
    """One trace service name per process: a user's OTEL_SERVICE_NAME becomes a prefix."""
    prefix = os.environ.get(SERVICE_NAME_VARIABLE)
    return env | {SERVICE_NAME_VARIABLE: f"{prefix}-{service}"} if prefix else env


def ensure_prerequisites(settings: Settings) -> None:
    if not settings.insecure and not certs_present(settings.certs_dir):
        written = init_certs(settings.certs_dir)
        log.info("created dev certificates in %s (%d files)", settings.certs_dir, len(written))
    # The default model is ours to build: also when an older Sluice built it without a manifest.
    stale_default = settings.model == DEFAULT_MODEL and not (settings.model / MANIFEST).exists()
    if not settings.model.exists() or stale_default:
        if settings.model != DEFAULT_MODEL:
            raise FileNotFoundError(f"model directory {settings.model} does not exist")
        from services.inference.default_model import build_default_model

        log.info("building the default model in %s", settings.model)
        build_default_model(settings.model, force=True)


def ensure_api_key(settings: Settings) -> str | None:
    """With auth on and no key yet, create one named `default`: returns it (shown once)."""
    if not settings.auth or keys.load(settings.keys_file).keys:
        return None
    plain, _ = keys.create(settings.keys_file, "default")
    return plain


def _wait_http_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise ChildFailed(f"{url} did not report healthy within {timeout:.0f}s")


def up(
    settings: Settings,
    state_file: Path | None,
    log_dir: Path | None,
    startup_timeout: float,
    with_envoy: bool = False,
    replicas: dict[str, int] | None = None,
    extra_models: list[tuple[Path, str]] | None = None,
) -> int:
    started = time.monotonic()
    ensure_prerequisites(settings)
    new_key = ensure_api_key(settings)
    embedding = resolve_embedding_model(settings.embedding_model)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    env = settings.to_env()
    with tempfile.TemporaryDirectory(prefix="sluice-up-") as run_dir:
        supervisor = Supervisor(Path(run_dir), log_dir)
        try:
            ready = _start_mesh(
                settings, supervisor, env, startup_timeout, replicas or {}, extra_models or [], embedding
            )
            if with_envoy:
                ready["envoy"] = start_envoy(
                    settings, supervisor, Path(run_dir), ready["edge"].address, startup_timeout
                )
        except (ChildFailed, FileNotFoundError) as err:
            log.error("%s", err)
            supervisor.stop_all(settings.drain_grace_s)
            return 1
        base_url = f"http://{ready['edge'].address}/v1"
        state = {"base_url": base_url, "services": {k: asdict(v) for k, v in ready.items()}}
        curl = f"curl {base_url}"
        if "envoy" in ready:
            state["envoy_url"] = base_url = f"https://{ready['envoy'].address}/v1"
            curl = f"curl --cacert {ca_paths(settings.certs_dir).cert} {base_url}"
        if state_file is not None:
            state_file.write_text(json.dumps(state, indent=2))
        if new_key:
            print(f"Created API key 'default' (shown only now; more with `sluice keys create`):\n  {new_key}")
        auth = f' -H "Authorization: Bearer {new_key or "$SLUICE_API_KEY"}"' if settings.auth else ""
        print(
            f"Sluice is up in {time.monotonic() - started:.1f}s: model {settings.model_name} at {base_url}\n"
            f'  {curl}/chat/completions{auth} -H "Content-Type: application/json" '
            f'-d \'{{"model": "{settings.model_name}", "max_tokens": 32, '
            f'"messages": [{{"role": "user", "content": "Hello"}}]}}\'\n'
            "  Ctrl-C stops every service.",
            flush=True,
        )
        if embedding is not None:
            print(f"  Embeddings: model {embedding.name} at {base_url}/embeddings", flush=True)
        code = 0
        while not stop.wait(0.5) and not code:
            for dead in supervisor.newly_exited():
                alive = [c.name for c in supervisor.running() if service_of(c.name) == service_of(dead.name)]
                if alive:
                    # A lost replica is not a lost service: the edge routes around it.
                    log.error("%s exited with code %s; %s keep serving\n%s",
                              dead.name, dead.process.returncode, ", ".join(alive), dead.log_tail())  # fmt: skip
                    continue
                log.error(
                    "%s exited with code %s; stopping the mesh\n%s", dead.name, dead.process.returncode, dead.log_tail()
                )
                code = 1
        supervisor.stop_all(settings.drain_grace_s + 5)
        return code


def replica_names(service: str, count: int) -> list[str]:
    """Child names for a service's replicas: the first keeps the service's name."""
    return [service if i == 0 else f"{service}-{i + 1}" for i in range(count)]


def service_of(child_name: str) -> str:
    return child_name.split("-", 1)[0]


def inference_env(settings: Settings, env: dict[str, str], count: int) -> dict[str, str]:
    """Replicas on one machine share its cores: with torch_threads left at auto, each gets its
    share, since several processes each running a thread per core oversubscribe the CPU and
    torch's spinning workers then slow every replica many times over."""
    if count < 2 or settings.torch_threads:
        return env
    share = max(1, (os.cpu_count() or 1) // count)
    log.info("%d inference replicas on this machine: %d torch thread(s) each", count, share)
    return env | {"SLUICE_TORCH_THREADS": str(share)}


def _start_mesh(
    settings: Settings, supervisor: Supervisor, env: dict[str, str], timeout: float, replicas: dict[str, int],
    extra_models: list[tuple[Path, str]], embedding: EmbeddingModel | None,
) -> dict[str, ReadyInfo]:  # fmt: skip
    # The backends start together (the model load dominates); the edge needs their addresses.
    envs = {service: _child_env(env, service) for service in BACKENDS}
    envs["inference"] = inference_env(settings, envs["inference"], replicas.get("inference", 1))
    children = {
        name: supervisor.start(name, _serve_argv(service), envs[service])
        for service in BACKENDS
        for name in replica_names(service, replicas.get(service, 1))
    }
    # More inference instances, each serving one more model (the embedding model, other models,
    # canary versions); the edge routes between them by model.
    more = {f"inference-m{i}": (path, path.resolve().name, version, None)
            for i, (path, version) in enumerate(extra_models, start=2)}  # fmt: skip
    if embedding is not None:
        more["inference-embed"] = (embedding.path, embedding.name, "", embedding.manifest)
    for name, (path, served_name, version, manifest) in more.items():
        child_env = {k: v for k, v in envs["inference"].items() if k != "SLUICE_MODEL_MANIFEST"} | {
            "SLUICE_MODEL": str(path), "SLUICE_SERVED_MODEL_NAME": served_name,
            "SLUICE_SERVED_MODEL_VERSION": version, "SLUICE_INFERENCE_PORT": "0",
        }  # fmt: skip
        if manifest is not None:
            child_env["SLUICE_MODEL_MANIFEST"] = str(manifest)
        children[name] = supervisor.start(name, _serve_argv("inference"), child_env)
    ready = {name: supervisor.wait_ready(child, timeout) for name, child in children.items()}
    for name, info in ready.items():
        with sync_channel(settings, info.address, "edge") as channel:
            if not wait_serving(channel, timeout):
                raise ChildFailed(f"{name} at {info.address} is not SERVING")
    edge_env = env | {
        f"SLUICE_{service.upper()}_ADDR": ",".join(info.address for name, info in ready.items()
                                                   if service_of(name) == service)
        for service in BACKENDS
    }  # fmt: skip
    edge = supervisor.start("edge", _serve_argv("edge"), _child_env(edge_env, "edge"))
    ready["edge"] = supervisor.wait_ready(edge, timeout)
    _wait_http_ready(f"http://{ready['edge'].address}/health", timeout)
    return ready
