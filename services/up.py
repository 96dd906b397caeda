"""`sluice up`: the whole mesh on one machine, each service its own process.

Certificates and the default model are created on first start; internal ports are free
ones unless configured. Prints the base URL once every service is healthy, restarts a
service that dies (on the ports it had), and stops everything cleanly on Ctrl-C or SIGTERM,
or when a service keeps crashing.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client import start_http_server

from services.edge_http.core import keys
from services.entry_urls import entry_urls, interface_addresses
from services.inference.embedding_default import EmbeddingModel
from services.inference.manifest import MANIFEST
from services.ingress.envoy_runner import start_envoy
from services.mesh.config import DEFAULT_MODEL, Settings, env_name, is_loopback
from services.mesh.lifecycle.ready import ReadyInfo, advertised_address
from services.mesh.lifecycle.signals import StopSignals
from services.mesh.lifecycle.supervisor import ChildFailed, ChildSpec, CrashLoop, Supervisor
from services.mesh.rpc.certs import ca_paths, certs_present, init_certs
from services.mesh.rpc.channels import sync_channel
from services.mesh.rpc.health import wait_serving
from services.mesh.telemetry import SERVICE_NAME_VARIABLE

log = logging.getLogger(__name__)

BACKENDS = ("preprocess", "cache", "inference")
# The inference process's environment (docs/design.md, CPU threads and memory):
INFERENCE_ENVIRONMENT = {
    # torch's OpenMP workers sleep when idle instead of spinning on the core the edge, preprocess
    # and the clients need between every two operations.
    "OMP_WAIT_POLICY": "PASSIVE",
    # glibc keeps freed memory for the next step instead of handing large blocks back to the
    # kernel at once: a step's large temporaries (KV gathers, activations) are then not
    # page-faulted in afresh every step. Read once, when the process starts.
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}
SUPERVISE_INTERVAL_S = 0.5


def _serve_argv(service: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "services.cli", "serve", service)


def _child_env(env: Mapping[str, str], service: str) -> dict[str, str]:
    """One trace service name per process: a user's OTEL_SERVICE_NAME becomes a prefix."""
    prefix = os.environ.get(SERVICE_NAME_VARIABLE)
    return {**env, SERVICE_NAME_VARIABLE: f"{prefix}-{service}"} if prefix else dict(env)


def _port(address: str) -> str:
    return address.rpartition(":")[2]


def _port_number(address: str) -> int:
    return int(_port(address))


def pinned_ports(service: str) -> Callable[[ReadyInfo], dict[str, str]]:
    """The environment that brings a restarted `service` back on the ports it first bound, so the
    addresses the edge (static discovery) and clients hold stay valid."""

    def pinned(info: ReadyInfo) -> dict[str, str]:
        env = {env_name(f"{service}_port"): _port(info.address)}
        if info.metrics != info.address:  # gRPC services serve metrics on a port of their own
            env[env_name("metrics_port")] = _port(info.metrics)
        return env

    return pinned


def _service_spec(name: str, service: str, env: Mapping[str, str]) -> ChildSpec:
    return ChildSpec(name, _serve_argv(service), _child_env(env, service), pinned_env=pinned_ports(service))


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


def _wait_http_ready(url: str, timeout: float, stop: StopSignals) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and stop.received is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        stop.wait(0.1)
    raise ChildFailed(f"{url} did not report healthy within {timeout:.0f}s")


@dataclass(frozen=True)
class MeshPlan:
    """What `sluice up` runs besides one process per service for the settings' own model."""

    replicas: Mapping[str, int] = field(default_factory=dict)
    extra_models: tuple[tuple[Path, str], ...] = ()  # (directory, version)
    embedding: EmbeddingModel | None = None
    with_envoy: bool = False


@dataclass(frozen=True)
class Listener:
    """A public listener: how it is spoken to, the address it is bound to, and its port."""

    scheme: str
    bind_host: str
    port: int

    @property
    def base_url(self) -> str:
        """The base URL on this machine (a wildcard bind is reached at 127.0.0.1)."""
        return f"{self.scheme}://{advertised_address(self.bind_host, self.port)}/v1"


@dataclass(frozen=True)
class Entry:
    """Where clients send requests: the edge, and Envoy in front of it when there is one."""

    edge: Listener
    envoy: Listener | None = None

    @property
    def public(self) -> Listener:
        return self.envoy or self.edge


def up(
    settings: Settings, plan: MeshPlan, state_file: Path | None, log_dir: Path | None, startup_timeout: float
) -> int:
    started = time.monotonic()
    stop = StopSignals()
    try:
        ensure_prerequisites(settings)
    except FileNotFoundError as err:
        log.error("%s", err)
        return 1
    new_key = ensure_api_key(settings)
    metrics_httpd, _ = start_http_server(0, addr=settings.host)
    metrics = advertised_address(settings.host, metrics_httpd.server_port)
    with tempfile.TemporaryDirectory(prefix="sluice-up-") as run_dir:
        supervisor = Supervisor(Path(run_dir), log_dir, startup_timeout_s=startup_timeout, stop=stop)
        try:
            entry = _start_mesh(settings, supervisor, Path(run_dir), startup_timeout, plan, stop)
        except (ChildFailed, FileNotFoundError) as err:
            log.error("%s", err)
            supervisor.stop_all(settings.stop_wait_s)
            metrics_httpd.shutdown()
            return 0 if stop.received else 1
        state = MeshState(state_file, entry, metrics)
        state.write(supervisor)
        _announce(settings, entry.public, new_key, plan.embedding, time.monotonic() - started)
        code = 0
        try:
            while not stop.wait(SUPERVISE_INTERVAL_S):
                if supervisor.supervise():
                    state.write(supervisor)
        except CrashLoop as err:
            log.error("%s\nstopping the mesh", err)
            code = 1
        if stop.received:
            log.info("%s: stopping every service (up to %.0fs to drain)", stop.received.name, settings.drain_grace_s)
        supervisor.stop_all(settings.stop_wait_s)
        metrics_httpd.shutdown()
        state.remove()  # nothing runs any more: `sluice status` must not show it
        return code


@dataclass(frozen=True)
class MeshState:
    """The state file: where to send requests, and each child's address, pid, state and restarts."""

    path: Path | None
    entry: Entry
    metrics: str  # the supervisor's own Prometheus endpoint (restarts, children up)

    def write(self, supervisor: Supervisor) -> None:
        if self.path is None:
            return
        services = {
            child.name: {**asdict(child.ready), "state": child.state.value, "restarts": child.restarts}
            for child in supervisor.children
            if child.ready is not None
        }
        state = {"base_url": self.entry.edge.base_url, "supervisor": {"pid": os.getpid(), "metrics": self.metrics}}
        if self.entry.envoy:
            state["envoy_url"] = self.entry.envoy.base_url
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text(json.dumps(state | {"services": services}, indent=2))
        os.replace(temporary, self.path)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _announce(
    settings: Settings, public: Listener, new_key: str | None, embedding: EmbeddingModel | None, took_s: float
) -> None:
    if new_key:
        print(f"Created API key 'default' (shown only now; more with `sluice keys create`):\n  {new_key}")
    urls = entry_urls(public.bind_host, public.port, public.scheme, interface_addresses())
    lines = [f"Sluice is up in {took_s:.1f}s: model {settings.model_name} at {public.base_url}"]
    if len(urls) > 1 or not is_loopback(public.bind_host):
        door = "API key required" if settings.auth else "NO API KEY REQUIRED: anyone who reaches the port is served"
        lines.append(f"  Listening on {public.bind_host or '0.0.0.0'}:{public.port} ({door}). Base URLs:")
        width = max(len(url.who) for url in urls)
        lines += [f"    {url.who:<{width}}  {url.url}" + (f"  ({url.note})" if url.note else "") for url in urls]
    curl = f"curl {public.base_url}"
    if public.scheme == "https":
        curl = f"curl --cacert {ca_paths(settings.certs_dir).cert} {public.base_url}"
    auth = f' -H "Authorization: Bearer {new_key or "$SLUICE_API_KEY"}"' if settings.auth else ""
    body = {"model": settings.model_name, "max_tokens": 32, "messages": [{"role": "user", "content": "Hello"}]}
    lines.append(f"  {curl}/chat/completions{auth} -H \"Content-Type: application/json\" -d '{json.dumps(body)}'")
    if embedding is not None:
        lines.append(f"  Embeddings: model {embedding.name} at {public.base_url}/embeddings")
    lines.append("  Ctrl-C stops every service.")
    print("\n".join(lines), flush=True)


def replica_names(service: str, count: int) -> list[str]:
    """Child names for a service's replicas: the first keeps the service's name."""
    return [service if i == 0 else f"{service}-{i + 1}" for i in range(count)]


def inference_env(settings: Settings, env: Mapping[str, str], count: int) -> dict[str, str]:
    """The environment of the inference instances on this machine, which they share with the
    edge, preprocess and often the clients.

    Replicas share its cores: with torch_threads left at auto, each gets its share, since
    several processes each running a thread per core oversubscribe the CPU and torch's spinning
    workers then slow every replica many times over. And the process runs with
    INFERENCE_ENVIRONMENT, each variable unless the environment sets it already."""
    shared = dict(env)
    for name, value in INFERENCE_ENVIRONMENT.items():
        if name not in os.environ:
            shared[name] = value
    if count < 2 or settings.torch_threads:
        return shared
    share = max(1, (os.cpu_count() or 1) // count)
    log.info("%d inference replicas on this machine: %d torch thread(s) each", count, share)
    return {**shared, env_name("torch_threads"): str(share)}


def _model_instances(env: Mapping[str, str], plan: MeshPlan) -> dict[str, dict[str, str]]:
    """More inference instances, each serving one more model (the embedding model, other models,
    canary versions): child name → its environment. The edge routes between them by model."""
    base = {k: v for k, v in env.items() if k != env_name("model_manifest")}
    instances = {}
    for i, (path, version) in enumerate(plan.extra_models, start=2):
        instances[f"inference-m{i}"] = base | {
            env_name("engine"): "builtin",  # --engine vllm drives the main model's workers only
            env_name("model"): str(path),
            env_name("served_model_name"): path.resolve().name,
            env_name("served_model_version"): version,
            env_name("inference_port"): "0",
        }
    if plan.embedding is not None:
        embedding = plan.embedding
        instances["inference-embed"] = base | {
            env_name("model"): str(embedding.path),
            env_name("served_model_name"): embedding.name,
            env_name("served_model_version"): "",
            env_name("inference_port"): "0",
        }
        if embedding.manifest is not None:
            instances["inference-embed"][env_name("model_manifest")] = str(embedding.manifest)
    return instances


def _vllm_workers(
    settings: Settings,
    supervisor: Supervisor,
    env: Mapping[str, str],
    plan: MeshPlan,
    timeout: float,
    stop: StopSignals,
) -> dict[str, dict[str, str]]:
    """With engine vllm and no worker address given: a vLLM worker per inference replica, started
    first (it loads the model); each replica's environment names its worker."""
    if settings.engine != "vllm" or settings.vllm_addr:
        return {}
    from services.inference.vllm_worker import start_worker

    names = replica_names("inference", plan.replicas.get("inference", 1))
    addresses = {
        name: start_worker(settings, supervisor, name.replace("inference", "vllm"), dict(env), timeout, stop)
        for name in names
    }
    return {name: {env_name("vllm_addr"): address} for name, address in addresses.items()}


def _start_mesh(
    settings: Settings, supervisor: Supervisor, run_dir: Path, timeout: float, plan: MeshPlan, stop: StopSignals
) -> Entry:
    """Start every child and wait until each is healthy."""
    env = settings.to_env()
    # The backends start together (the model load dominates); the edge needs their addresses.
    envs = {service: env for service in BACKENDS}
    envs["inference"] = inference_env(settings, env, plan.replicas.get("inference", 1))
    workers = _vllm_workers(settings, supervisor, envs["inference"], plan, timeout, stop)
    specs = [
        (service, _service_spec(name, service, envs[service] | workers.get(name, {})))
        for service in BACKENDS
        for name in replica_names(service, plan.replicas.get(service, 1))
    ]
    specs += [
        ("inference", _service_spec(name, "inference", instance_env))
        for name, instance_env in _model_instances(envs["inference"], plan).items()
    ]
    children = [(service, supervisor.start(spec)) for service, spec in specs]
    ready = [(service, supervisor.wait_ready(child, timeout)) for service, child in children]
    for _, info in ready:
        with sync_channel(settings, info.address, "edge") as channel:
            if not wait_serving(channel, timeout):
                raise ChildFailed(f"{info.service} at {info.address} is not SERVING")
    edge_env = env | {
        env_name(f"{service}_addr"): ",".join(info.address for of, info in ready if of == service)
        for service in BACKENDS
    }
    if plan.with_envoy:
        # Envoy is the public door: the edge behind it stays where the backends are.
        edge_env[env_name("public_host")] = settings.host
    edge = supervisor.start(_service_spec("edge", "edge", edge_env))
    edge_address = supervisor.wait_ready(edge, timeout).address
    _wait_http_ready(f"http://{edge_address}/health", timeout, stop)
    edge_bind = settings.host if plan.with_envoy else settings.listen_host
    entry = Entry(Listener("http", edge_bind, _port_number(edge_address)))
    if plan.with_envoy:
        envoy = start_envoy(settings, supervisor, run_dir, edge_address, timeout)
        entry = Entry(entry.edge, Listener("https", settings.listen_host, _port_number(envoy.address)))
    return entry
