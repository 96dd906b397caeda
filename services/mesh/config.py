"""Sluice configuration: defaults < TOML file (SLUICE_CONFIG or --config) < SLUICE_* env vars < flags.

One settings model serves every command, so a TOML file or an environment set once
configures the whole mesh, and `sluice up` hands the same values to its children.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

CONFIG_ENV = "SLUICE_CONFIG"
_REPLICAS = ", comma-separated for replicas (static discovery)"
ENV_PREFIX = "SLUICE_"
DEFAULT_MODEL = Path("models/sluice-tiny")
# What a process needs beyond its drain grace to close its servers and exit.
STOP_MARGIN_S = 5.0


def env_name(setting: str) -> str:
    """The environment variable that carries a setting (`edge_port` → `SLUICE_EDGE_PORT`)."""
    return ENV_PREFIX + setting.upper()


# Who reads a setting: every service (MESH), one service, `sluice envoy-config` and Envoy under
# `sluice up` (ENVOY), or `sluice up` alone (UP). The command line offers each setting exactly
# where it is read; `sluice up` offers all of them but those it decides itself (up=False).
MESH, PREPROCESS, INFERENCE, CACHE, EDGE, ENVOY, UP = "mesh", "preprocess", "inference", "cache", "edge", "envoy", "up"
SERVICES = (PREPROCESS, INFERENCE, CACHE, EDGE)


def used_by(*readers: str, up: bool = True) -> dict[str, Any]:
    return {"used_by": list(readers), "up": up}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: str = Field("127.0.0.1", description="address every service binds to", json_schema_extra=used_by(MESH, ENVOY))
    public_host: str = Field(
        "",
        description="address the public entry points bind to: the edge's OpenAI API, and Envoy's listener in "
        "front of it (default: host; 0.0.0.0: every interface, for Dify in Docker or on other machines)",
        json_schema_extra=used_by(EDGE, ENVOY),
    )
    advertise_host: str = Field(
        "",
        description="host other machines reach this service at (default: host; 127.0.0.1 for 0.0.0.0)",
        json_schema_extra=used_by(MESH),
    )
    certs_dir: Path = Field(
        Path("certs"), description="folder with ca.crt and <service>.crt/.key", json_schema_extra=used_by(MESH, ENVOY)
    )
    insecure: bool = Field(
        False, description="plaintext gRPC between services (development only; warns)", json_schema_extra=used_by(MESH)
    )

    model: Path = Field(
        DEFAULT_MODEL,
        description="Hugging Face model directory to serve",
        json_schema_extra=used_by(PREPROCESS, INFERENCE),
    )
    served_model_name: str = Field(
        "",
        description="model id clients send (default: the directory name)",
        json_schema_extra=used_by(PREPROCESS, INFERENCE),
    )
    served_model_version: str = Field(
        "", description="version of the model this instance serves (e.g. 2)", json_schema_extra=used_by(INFERENCE)
    )
    model_manifest: Path | None = Field(
        None,
        description="SHA-256 manifest (default: <model>/sluice-manifest.json)",
        json_schema_extra=used_by(INFERENCE),
    )
    reasoning_tags: str = Field(
        "auto",
        description="OPEN,CLOSE tags of the reasoning block outputs open with (auto: <think> if the "
        "tokenizer knows it; none: off)",
        json_schema_extra=used_by(INFERENCE),
    )
    reasoning_field: Literal["both", "reasoning_content", "reasoning"] = Field(
        "both",
        description="edge: the field reasoning text is sent in (reasoning_content: DeepSeek's, Dify's; "
        "reasoning: vLLM's newer name; both)",
        json_schema_extra=used_by(EDGE),
    )
    tool_parser: str = Field(
        "auto",
        description="how the model writes tool calls: hermes, json, none (auto: from its chat template)",
        json_schema_extra=used_by(INFERENCE),
    )
    embedding_model: str = Field(
        "auto",
        description="sluice up: embedding model directory to serve too (auto: all-MiniLM-L6-v2; none: off)",
        json_schema_extra=used_by(UP),
    )
    embedding_truncate: bool = Field(
        True,
        description="cut embedding inputs longer than the model takes to its limit (false: refuse them, 400) "
        "unless a request sets truncate_prompt_tokens",
        json_schema_extra=used_by(EDGE),
    )
    allow_missing_manifest: bool = Field(
        False,
        description="serve a model directory without sluice-manifest.json, unverified (warns)",
        json_schema_extra=used_by(INFERENCE),
    )
    engine: Literal["builtin", "vllm"] = Field(
        "builtin",
        description="what generates: the built-in engine, or a vLLM worker driven over its gRPC protocol at vllm_addr",
        json_schema_extra=used_by(INFERENCE),
    )
    vllm_addr: str = Field(
        "",
        description="engine vllm: host:port of the vLLM worker's gRPC server (sluice up: empty starts one)",
        json_schema_extra=used_by(INFERENCE),
    )
    vllm_command: str = Field(
        "",
        description="sluice up, engine vllm: the vllm program (default: .venv-vllm/bin/vllm if there, else vllm "
        "on PATH)",
        json_schema_extra=used_by(UP),
    )
    vllm_args: str = Field(
        "",
        description="sluice up, engine vllm: more arguments for `vllm serve`, e.g. --tensor-parallel-size 2",
        json_schema_extra=used_by(UP),
    )
    device: str = Field(
        "auto", description="torch device for inference: auto, cpu, cuda, cuda:N", json_schema_extra=used_by(INFERENCE)
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="the weights' and KV cache's number format in inference (auto: bfloat16 on CUDA and on CPUs with "
        "native bf16 instructions, float32 elsewhere)",
        json_schema_extra=used_by(INFERENCE),
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="CPU threads per torch op in inference (0: auto, measured at start: one unless more pay)",
        json_schema_extra=used_by(INFERENCE),
    )

    edge_port: int = Field(8000, description="HTTP port of the OpenAI API", json_schema_extra=used_by(EDGE, ENVOY))
    preprocess_port: int = Field(
        0, description="gRPC port of preprocess (0: a free port)", json_schema_extra=used_by(PREPROCESS)
    )
    inference_port: int = Field(
        0, description="gRPC port of inference (0: a free port)", json_schema_extra=used_by(INFERENCE)
    )
    cache_port: int = Field(0, description="gRPC port of cache (0: a free port)", json_schema_extra=used_by(CACHE))
    metrics_port: int = Field(
        0,
        description="Prometheus port of a gRPC service (0: a free port)",
        json_schema_extra=used_by(PREPROCESS, INFERENCE, CACHE, up=False),
    )

    discovery: Literal["static", "consul", "dns"] = Field(
        "static",
        description="how services find each other: the *_addr settings as they are, Consul, or the *_addr "
        "names resolved to every address they have (Kubernetes headless Services)",
        json_schema_extra=used_by(MESH),
    )
    dns_refresh_s: float = Field(
        5.0,
        gt=0,
        description="dns discovery: how often the *_addr names are resolved again",
        json_schema_extra=used_by(EDGE),
    )
    dns_server: str = Field(
        "",
        description="dns discovery: host:port of the DNS server to ask (default: the system's resolvers)",
        json_schema_extra=used_by(EDGE),
    )
    consul_addr: str = Field(
        "127.0.0.1:8500", description="host:port of the local Consul agent's HTTP API", json_schema_extra=used_by(MESH)
    )
    consul_scheme: Literal["http", "https"] = Field(
        "http", description="scheme of the Consul HTTP API", json_schema_extra=used_by(MESH)
    )
    consul_token: str = Field("", description="Consul ACL token", json_schema_extra=used_by(MESH))
    consul_ca: str = Field(
        "",
        description="CA file to verify Consul's HTTPS certificate (default: system CAs)",
        json_schema_extra=used_by(MESH),
    )
    consul_check_interval_s: float = Field(
        5.0, gt=0, description="Consul gRPC check interval; TTL is 3x this", json_schema_extra=used_by(MESH)
    )
    stall_timeout_s: float = Field(
        30.0,
        gt=0,
        description="inference turns NOT_SERVING when its engine makes no progress this long with work",
        json_schema_extra=used_by(INFERENCE),
    )

    preprocess_addr: str = Field(
        "",
        description="host:port of preprocess, comma-separated for replicas (static discovery)",
        json_schema_extra=used_by(EDGE, ENVOY, up=False),
    )
    inference_addr: str = Field(
        "",
        description="host:port of inference, comma-separated for replicas (static discovery)",
        json_schema_extra=used_by(EDGE, ENVOY, up=False),
    )
    cache_addr: str = Field(
        "", description=f"host:port of cache{_REPLICAS}", json_schema_extra=used_by(EDGE, ENVOY, up=False)
    )

    max_running: int = Field(
        32, ge=1, description="sequences decoded together in one batch", json_schema_extra=used_by(INFERENCE)
    )
    max_waiting: int = Field(
        256,
        ge=0,
        description="requests queued for the batch; more are refused (429)",
        json_schema_extra=used_by(INFERENCE),
    )
    max_batched_tokens: int = Field(
        512,
        ge=8,
        description="tokens packed into one forward pass (decode + prefill)",
        json_schema_extra=used_by(INFERENCE),
    )
    prefill_chunk: int = Field(
        256, ge=1, description="prompt tokens prefilled per sequence per step", json_schema_extra=used_by(INFERENCE)
    )
    kv_cache_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="KV cache budget of the inference engine in bytes",
        json_schema_extra=used_by(INFERENCE),
    )
    kv_block_size: int = Field(
        16, ge=1, le=1024, description="token positions per KV cache block", json_schema_extra=used_by(INFERENCE)
    )
    batch_invariant: bool = Field(
        False,
        description="bitwise-identical output whatever shares the batch (slower: see docs/benchmarks.md)",
        json_schema_extra=used_by(INFERENCE),
    )
    prepack_weights: bool = Field(
        True,
        description="CPU: run linear layers on weights prepacked for oneDNN at start (faster; off in batch_invariant "
        "mode)",
        json_schema_extra=used_by(INFERENCE),
    )
    prefix_caching: bool = Field(
        True,
        description="reuse the KV of prompt prefixes computed before (kept in free KV blocks until they are wanted)",
        json_schema_extra=used_by(INFERENCE),
    )

    cache_backend: Literal["memory", "redis"] = Field(
        "memory",
        description="where the cache service keeps completions (redis: shared by replicas)",
        json_schema_extra=used_by(CACHE, EDGE),
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis for cache_backend=redis", json_schema_extra=used_by(CACHE, EDGE)
    )
    cache_enabled: bool = Field(True, description="cache deterministic completions", json_schema_extra=used_by(EDGE))
    cache_max_entries: int = Field(4096, ge=1, description="cache entry bound", json_schema_extra=used_by(CACHE))
    cache_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="cache size bound in bytes", json_schema_extra=used_by(CACHE)
    )
    cache_ttl_s: float = Field(
        3600.0, gt=0, description="seconds a cached completion stays valid", json_schema_extra=used_by(CACHE)
    )

    envoy_port: int = Field(
        8443,
        description="TLS port Envoy serves the OpenAI API on (sluice up --with-envoy)",
        json_schema_extra=used_by(ENVOY),
    )
    envoy_grpc_port: int = Field(
        8444,
        description="mTLS port of Envoy's internal gRPC listener (--internal-grpc)",
        json_schema_extra=used_by(ENVOY),
    )
    envoy_admin_port: int = Field(
        0, description="Envoy admin port on 127.0.0.1 (0: a free port)", json_schema_extra=used_by(ENVOY)
    )
    envoy_tls_cert: str = Field(
        "",
        description="certificate Envoy presents to clients (default: certs/envoy.crt)",
        json_schema_extra=used_by(ENVOY),
    )
    envoy_tls_key: str = Field(
        "", description="its private key (default: certs/envoy.key)", json_schema_extra=used_by(ENVOY)
    )
    envoy_rate_limit_rps: int = Field(
        200, ge=0, description="requests per second Envoy admits, burst 2x (0: off)", json_schema_extra=used_by(ENVOY)
    )

    auth: bool = Field(
        True,
        description="require an API key (Authorization: Bearer) at the edge; --no-auth serves anyone",
        json_schema_extra=used_by(EDGE),
    )
    public_without_auth: bool = Field(
        False,
        description="let --no-auth serve on a public_host beyond loopback: anyone who reaches the port is "
        "served (warns)",
        json_schema_extra=used_by(EDGE),
    )
    keys_file: Path = Field(
        Path("sluice-keys.json"),
        description="API keys (salted hashes) from `sluice keys create`",
        json_schema_extra=used_by(EDGE),
    )
    max_request_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="largest request body the edge and Envoy accept (413)",
        json_schema_extra=used_by(EDGE, ENVOY),
    )
    max_messages: int = Field(
        1024, ge=1, description="most chat messages one request may carry", json_schema_extra=used_by(EDGE)
    )
    max_tokens_limit: int = Field(
        4096,
        ge=1,
        description="most tokens one request may generate (max_tokens above it is refused)",
        json_schema_extra=used_by(EDGE),
    )

    model_weights: str = Field(
        "", description="edge: traffic shares of model versions, e.g. m@1=90,m@2=10", json_schema_extra=used_by(EDGE)
    )
    model_aliases: str = Field(
        "",
        description="edge: other names for model ids, e.g. deepseek-chat=qwen2.5-7b",
        json_schema_extra=used_by(EDGE),
    )

    sse_keepalive_s: float = Field(
        15.0,
        gt=0,
        description="edge: a `: ping` SSE comment this often while a stream waits for its first token",
        json_schema_extra=used_by(EDGE),
    )
    prefix_routing: bool = Field(
        True,
        description="edge: send a prompt to the inference replica that computed its prefix, unless it is busier "
        "than its share (see docs/prefix-caching.md)",
        json_schema_extra=used_by(EDGE),
    )
    upstream_timeout_s: float = Field(
        10.0, gt=0, description="deadline for unary calls between services", json_schema_extra=used_by(EDGE, ENVOY)
    )
    generate_timeout_s: float = Field(
        600.0, gt=0, description="deadline for one generation", json_schema_extra=used_by(EDGE, ENVOY)
    )
    drain_grace_s: float = Field(
        10.0, ge=0, description="seconds in-flight work may finish after SIGTERM", json_schema_extra=used_by(MESH)
    )
    health_watch_interval_s: float = Field(
        1.0,
        gt=0,
        description="edge: how soon an instance whose health watch ended is watched again",
        json_schema_extra=used_by(EDGE),
    )
    health_check_timeout_s: float = Field(
        2.0,
        gt=0,
        description="edge: deadline of each instance's health check behind GET /health",
        json_schema_extra=used_by(EDGE),
    )
    log_level: str = Field("info", description="debug, info, warning or error", json_schema_extra=used_by(MESH))
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="log lines as short text for people (auto: on a terminal) or JSON objects (auto: files, pipes)",
        json_schema_extra=used_by(MESH),
    )

    @model_validator(mode="after")
    def _no_open_door(self) -> Settings:
        """An edge reachable from the network never serves without keys unless told so in words."""
        if not self.auth and not self.public_without_auth and not is_loopback(self.listen_host):
            raise ValueError(
                f"--no-auth with the edge listening on {self.listen_host} would serve anyone who reaches the port: "
                "keep auth on (create keys with `sluice keys create`), listen on 127.0.0.1, or waive it "
                "explicitly with --public-without-auth"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = os.environ.get(CONFIG_ENV)
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"{CONFIG_ENV}={config_file}: no such config file")
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=config_file),)
        return sources

    @property
    def listen_host(self) -> str:
        """Where the public entry points (edge, Envoy's listener) bind."""
        return self.public_host or self.host

    @property
    def stop_wait_s(self) -> float:
        """How long a stopping process may take: its drain grace, and a margin to exit after it."""
        return self.drain_grace_s + STOP_MARGIN_S

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.resolve().name

    def to_env(self) -> dict[str, str]:
        """The settings as SLUICE_* variables, so child processes see exactly these values."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue  # unset: the child's default, as here
            env[env_name(name)] = str(value).lower() if isinstance(value, bool) else str(value)
        return env


def settings_error(err: ValidationError) -> str:
    """A settings error as a person reads it: the setting, as its flag, and what is wrong."""
    parts = []
    for error in err.errors():
        message = error["msg"].removeprefix("Value error, ")
        names = [str(part) for part in error["loc"]]
        parts.append(f"--{'-'.join(names).replace('_', '-')}: {message}" if names else message)
    return "; ".join(parts)


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this machine only (a name other than localhost is
    taken as reachable from elsewhere)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def settings_for(*readers: str) -> list[str]:
    """The settings any of `readers` reads, in the order Settings declares them."""
    wanted = set(readers)
    return [name for name, field in Settings.model_fields.items() if wanted & set(_extra(field)["used_by"])]


def up_settings() -> list[str]:
    """The settings `sluice up` takes: all but those it decides for its children itself."""
    return [name for name, field in Settings.model_fields.items() if _extra(field)["up"]]


def _extra(field: Any) -> dict[str, Any]:
    return field.json_schema_extra  # type: ignore[no-any-return]


def comma_list(text: str) -> list[str]:
    """A comma-separated setting (`a, b,,c`) as its non-empty items, stripped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _flag_type(annotation: Any) -> type:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def add_setting_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    """Expose the named settings as --kebab-case flags whose help comes from the field descriptions."""
    for name in names:
        field = Settings.model_fields[name]
        flag = "--" + name.replace("_", "-")
        kind = _flag_type(field.annotation)
        help_text = f"{field.description} (env {env_name(name)}; default {field.default})"
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(flag, dest=name, choices=typing.get_args(kind), default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, help=help_text)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help=f"TOML config file (env {CONFIG_ENV})")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Build settings from a parsed command line: flags left unset fall back to env, file, defaults."""
    config = getattr(args, "config", None)
    if config is not None:
        # Through the environment, so processes started by this one read the same file.
        os.environ[CONFIG_ENV] = str(config)
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**overrides)
