"""`sluice status`: what a running mesh is doing, as a table (or JSON).

It reads where the services are from `sluice up`'s state file, or from Consul, then asks each
one: grpc.health.v1 for the gRPC services (over mTLS, as the edge), `GET /health` for the edge,
ListModels for what an inference instance serves, and every instance's Prometheus endpoint for
its uptime and, for inference, its queue, running sequences, KV blocks and tokens per second
over the last minute. The edge's metrics give the completion cache's hit ratio.

Gathering takes its probes as arguments (`Probes`), so the table is tested without a network.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.mesh.config import Settings

Samples = dict[str, float]  # "name" or "name{label=value}" → value


@dataclass(frozen=True)
class Located:
    """An instance as the source knows it."""

    name: str  # the child name (`inference-2`) or the Consul service id
    service: str
    address: str
    metrics: str = ""  # host:port of its /metrics, when known
    state: str = ""  # what the supervisor says (running, restarting, …) or Consul's checks
    restarts: int | None = None  # under `sluice up` only


@dataclass(frozen=True)
class InstanceStatus:
    name: str
    service: str
    address: str
    healthy: bool
    state: str
    restarts: int | None
    uptime_s: float | None
    model: str = ""  # inference: id@version
    waiting: float | None = None
    running: float | None = None
    kv_used: float | None = None
    kv_total: float | None = None
    tokens_per_s: float | None = None


@dataclass(frozen=True)
class ModelStatus:
    model: str
    instances: int
    serving: int
    waiting: float
    running: float
    kv_used_share: float | None
    tokens_per_s: float


@dataclass(frozen=True)
class MeshStatus:
    base_url: str
    instances: list[InstanceStatus]
    models: list[ModelStatus] = field(default_factory=list)
    cache_hit_ratio: float | None = None  # completion cache, hits over hits and misses

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass(frozen=True)
class Probes:
    """How each fact is asked for (real network calls in `network_probes`)."""

    grpc_serving: Callable[[Located], bool]
    edge_serving: Callable[[str], bool]  # base URL → /health answered 200
    metrics: Callable[[str], Samples]  # host:port → samples ({} when unreachable)
    model: Callable[[Located], str]  # inference instance → "id@version" ("" when unknown)
    clock: Callable[[], float] = time.time


def gather(base_url: str, located: Iterable[Located], probes: Probes) -> MeshStatus:
    instances = []
    edge_samples: Samples = {}
    for where in located:
        samples = probes.metrics(where.metrics) if where.metrics else {}
        if where.service == "edge":
            edge_samples = samples
            healthy = probes.edge_serving(base_url)
        else:
            healthy = probes.grpc_serving(where)
        started = samples.get("process_start_time_seconds")
        status = InstanceStatus(
            where.name,
            where.service,
            where.address,
            healthy,
            where.state or ("serving" if healthy else "down"),
            where.restarts,
            probes.clock() - started if started else None,
        )
        if where.service == "inference":
            # Asked even when not SERVING: a draining or hung instance still says what it serves.
            status = _with_engine(status, probes.model(where), samples if healthy else {})
        instances.append(status)
    # An outcome that never happened has no sample yet.
    hits = edge_samples.get("sluice_edge_cache_total{result=hit}", 0.0)
    misses = edge_samples.get("sluice_edge_cache_total{result=miss}", 0.0)
    ratio = hits / (hits + misses) if hits + misses else None
    return MeshStatus(base_url, instances, _models(instances), ratio)


def _with_engine(status: InstanceStatus, model: str, samples: Samples) -> InstanceStatus:
    used = samples.get("sluice_inference_kv_blocks{state=used}")
    free = samples.get("sluice_inference_kv_blocks{state=free}")
    return InstanceStatus(
        **{
            **asdict(status),
            "model": model,
            "waiting": samples.get("sluice_inference_queue_depth"),
            "running": samples.get("sluice_inference_running_sequences"),
            "kv_used": used,
            "kv_total": used + free if used is not None and free is not None else None,
            "tokens_per_s": samples.get("sluice_inference_tokens_per_second"),
        }
    )


def _models(instances: list[InstanceStatus]) -> list[ModelStatus]:
    by_model: dict[str, list[InstanceStatus]] = {}
    for instance in instances:
        if instance.service == "inference":
            by_model.setdefault(instance.model or "(not answering)", []).append(instance)
    models = []
    for model, group in sorted(by_model.items()):
        serving = [i for i in group if i.healthy]
        used = sum(i.kv_used or 0 for i in serving)
        total = sum(i.kv_total or 0 for i in serving)
        models.append(
            ModelStatus(
                model,
                len(group),
                len(serving),
                sum(i.waiting or 0 for i in serving),
                sum(i.running or 0 for i in serving),
                used / total if total else None,
                sum(i.tokens_per_s or 0 for i in serving),
            )
        )
    return models


# ---------------------------------------------------------------- sources


def from_state_file(path: Path) -> tuple[str, list[Located]]:
    """The base URL and every child `sluice up` runs, from its --state-file."""
    state = json.loads(path.read_text())
    located = [
        Located(name, child["service"], child["address"], child["metrics"], child["state"], child["restarts"])
        for name, child in sorted(state["services"].items())
    ]
    return state.get("envoy_url") or state["base_url"], located


def from_consul(settings: Settings, base_url: str) -> list[Located]:
    """Every registered instance of every gRPC service (passing or not), and the edge at base_url."""
    from services.mesh.discovery.consul import SERVICE_PREFIX, client

    consul = client(settings)
    located = []
    for service in ("preprocess", "inference", "cache"):
        _, entries = consul.health.service(f"{SERVICE_PREFIX}{service}")
        for entry in entries:
            body = entry["Service"]
            passing = all(check["Status"] == "passing" for check in entry.get("Checks", []))
            located.append(
                Located(
                    body["ID"],
                    service,
                    f"{body['Address']}:{body['Port']}",
                    (body.get("Meta") or {}).get("metrics", ""),
                    "passing" if passing else "failing",
                )
            )
    edge = httpx.URL(base_url)
    located.append(Located("edge", "edge", f"{edge.host}:{edge.port}", f"{edge.host}:{edge.port}"))
    return located


# ---------------------------------------------------------------- the network


def network_probes(settings: Settings, timeout_s: float = 2.0) -> Probes:
    import grpc

    from services.mesh.rpc.channels import sync_channel
    from services.mesh.rpc.health import check
    from services.mesh.stubs.inference_pb2 import ListModelsRequest
    from services.mesh.stubs.inference_pb2_grpc import InferenceStub

    def grpc_serving(where: Located) -> bool:
        with sync_channel(settings, where.address, "edge") as channel:
            return check(channel, timeout=timeout_s)

    def model(where: Located) -> str:
        try:
            with sync_channel(settings, where.address, "edge") as channel:
                info = InferenceStub(channel).ListModels(ListModelsRequest(), timeout=timeout_s).models[0]
        except (grpc.RpcError, IndexError):  # mid-restart: status shows what it can
            return ""
        return f"{info.id}@{info.version}" if info.version else info.id

    def edge_serving(base_url: str) -> bool:
        try:
            return (
                httpx.get(base_url.removesuffix("/v1") + "/health", timeout=timeout_s, verify=False).status_code == 200
            )
        except httpx.HTTPError:
            return False

    def metrics(address: str) -> Samples:
        try:
            text = httpx.get(f"http://{address}/metrics", timeout=timeout_s).text
        except httpx.HTTPError:
            return {}
        return parse_samples(text)

    return Probes(grpc_serving, edge_serving, metrics, model)


def parse_samples(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


# ---------------------------------------------------------------- the table


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(status: MeshStatus) -> list:  # rich renderables
    from rich.table import Table

    services = Table(title=f"Sluice at {status.base_url}", title_justify="left")
    for column in ("service", "instance", "address", "health", "state", "restarts", "uptime"):
        services.add_column(column, justify="right" if column in ("restarts", "uptime") else "left")
    for i in status.instances:
        health = "[green]SERVING[/]" if i.healthy else "[red]DOWN[/]"
        restarts = "-" if i.restarts is None else str(i.restarts)
        services.add_row(i.service, i.name, i.address, health, i.state, restarts, _uptime(i.uptime_s))
    models = Table(title="Models", title_justify="left")
    for column in ("model", "instances", "waiting", "running", "KV used", "tokens/s (1 min)"):
        models.add_column(column, justify="left" if column == "model" else "right")
    for m in status.models:
        kv = "-" if m.kv_used_share is None else f"{m.kv_used_share:.1%}"
        instances = f"{m.serving}/{m.instances}"
        models.add_row(m.model, instances, _number(m.waiting), _number(m.running), kv, _number(m.tokens_per_s, 1))
    ratio = "-" if status.cache_hit_ratio is None else f"{status.cache_hit_ratio:.0%}"
    return [services, models, f"completion cache hit ratio: {ratio}"]
