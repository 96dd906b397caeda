"""The `sluice` command: parses arguments and dispatches; the work lives in the service packages."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from services.inference.default_model import PRESETS
from services.mesh.config import (
    DEFAULT_MODEL,
    ENVOY,
    MESH,
    SERVICES,
    Settings,
    add_config_flag,
    add_setting_flags,
    comma_list,
    settings_error,
    settings_for,
    settings_from_args,
    up_settings,
)
from services.mesh.logs import configure_logging

# Where `sluice up` says what runs, and `sluice status` looks (beside sluice-keys.json).
STATE_FILE = Path("sluice-state.json")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice",
        description="Serve a Hugging Face LLM to OpenAI-API clients through an mTLS gRPC mesh.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_up(commands)
    _add_serve(commands)
    _add_envoy(commands)
    _add_health(commands)
    _add_status(commands)
    _add_certs(commands)
    _add_keys(commands)
    _add_model(commands)
    return parser


def _add_up(commands: argparse._SubParsersAction) -> None:
    """`sluice up`: the whole mesh on this machine."""
    up = commands.add_parser(
        "up",
        help="run the whole mesh on this machine",
        description="Start preprocess, cache, inference and the edge as separate processes (creating dev "
        "certificates and the default model on first start), wait until all are healthy, print the "
        "base URL, and stop them all on Ctrl-C.",
    )
    add_config_flag(up)
    up.add_argument(
        "--port", dest="edge_port", type=int, default=None, help="HTTP port of the OpenAI API (default 8000)"
    )
    add_setting_flags(up, *(name for name in up_settings() if name != "edge_port"))
    up.add_argument(
        "--with-envoy",
        action="store_true",
        help="also start Envoy in front of the edge: TLS on --envoy-port (see `sluice envoy-config --help`)",
    )
    up.add_argument(
        "--replicas",
        type=_replicas,
        default={},
        metavar="SERVICE=N[,SERVICE=N]",
        help="run N processes of a backend service (e.g. inference=2); the edge balances across them",
    )
    up.add_argument(
        "--extra-model",
        dest="extra_models",
        type=_model_spec,
        action="append",
        default=[],
        metavar="DIR[@VERSION]",
        help="also serve this model directory (served as its directory name), e.g. a canary version of --model: "
        "models/v2/sluice-tiny@2 (repeatable; split traffic with --model-weights)",
    )
    up.add_argument(
        "--state-file",
        type=Path,
        default=STATE_FILE,
        help=f"write the base URL and every service's addresses, pids and restarts here, for `sluice status` "
        f"(JSON; default {STATE_FILE})",
    )
    up.add_argument(
        "--log-dir", type=Path, help="write each service's log to DIR/<service>.log instead of the terminal"
    )
    up.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for health (default 300)")


def _add_serve(commands: argparse._SubParsersAction) -> None:
    """`sluice serve SERVICE`: one service, as `sluice up` starts it."""
    serve = commands.add_parser("serve", help="run one service (what `sluice up` starts)")
    services = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for name in SERVICES:
        service = services.add_parser(name, help=f"run the {name} service", description=f"Run the {name} service.")
        add_config_flag(service)
        add_setting_flags(service, *settings_for(MESH, name))
        service.add_argument("--ready-file", type=Path, help="write the bound addresses here (JSON) once serving")


def _add_envoy(commands: argparse._SubParsersAction) -> None:
    """`sluice envoy-config`: the Envoy bootstrap for the ingress."""
    envoy = commands.add_parser(
        "envoy-config",
        help="generate an Envoy bootstrap for the ingress",
        description="Write an Envoy v3 bootstrap (YAML) generated from Sluice's settings: a TLS listener for "
        "clients (HTTP/1.1 and HTTP/2, SSE unbuffered, completion routes timed by the generation deadline, "
        "request size limit, local rate limit, JSON access log, OpenAI-shaped error replies) in front of the "
        "edge, with an actively health-checked, outlier-detected edge cluster. With --internal-grpc, a second "
        "mTLS listener also fronts preprocess, inference and cache (HTTP/2, gRPC health checks). The file is "
        "checked with `envoy --mode validate` when the Envoy binary is installed.",
    )
    add_config_flag(envoy)
    add_setting_flags(envoy, *settings_for(ENVOY))
    envoy.add_argument(
        "--edge-addr", default="", help="host:port of the edge (default: --public-host or --host, and --edge-port)"
    )
    envoy.add_argument("--internal-grpc", action="store_true", help="also front the gRPC services (mTLS both ways)")
    envoy.add_argument("--out", type=Path, help="write the bootstrap here (default: standard output)")
    envoy.add_argument("--no-validate", dest="validate", action="store_false", help="skip `envoy --mode validate`")


def _add_health(commands: argparse._SubParsersAction) -> None:
    """`sluice health SERVICE`: the probe for Kubernetes."""
    health = commands.add_parser(
        "health",
        help="exit 0 if a gRPC service is SERVING (a probe for Kubernetes)",
        description="Ask a Sluice gRPC service whether it is SERVING (grpc.health.v1), over mTLS with the "
        "service's own certificate, and exit 0 if it is, 1 if it answers NOT_SERVING (draining, a hung "
        "engine), 2 if it cannot be reached within the deadline. Meant as a Kubernetes exec probe: the "
        "kubelet's own gRPC probe cannot present a client certificate.",
    )
    health.add_argument("service", choices=[s for s in SERVICES if s != "edge"], help="which service to ask")
    health.add_argument("--address", help="host:port to ask (default: 127.0.0.1 and the service's port setting)")
    health.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the check (default 3)")
    add_config_flag(health)
    add_setting_flags(health, "certs_dir", "insecure", "preprocess_port", "inference_port", "cache_port")


def _add_status(commands: argparse._SubParsersAction) -> None:
    """`sluice status`: what a running mesh is doing."""
    status = commands.add_parser(
        "status",
        help="show what a running mesh is doing",
        description="Ask a running mesh what it is doing and print it as tables: every service and replica "
        "(address, health, supervisor state, restarts, uptime), every served model (instances serving, "
        "requests waiting, sequences running, KV cache in use, tokens per second over the last minute) and "
        "the completion cache's hit ratio. It finds the services in the state file `sluice up` writes, or "
        "in Consul (--discovery consul, with --url for the edge).",
    )
    status.add_argument(
        "--state-file", type=Path, default=STATE_FILE, help=f"what `sluice up` wrote (default {STATE_FILE})"
    )
    status.add_argument("--url", help="the edge's base URL, e.g. http://127.0.0.1:8000/v1 (with Consul)")
    status.add_argument("--json", action="store_true", help="print the status as JSON, for scripts")
    status.add_argument(
        "--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C (default: print once)"
    )
    add_config_flag(status)
    add_setting_flags(status, "certs_dir", "insecure", "discovery", "consul_addr", "consul_scheme", "consul_token")


def _add_certs(commands: argparse._SubParsersAction) -> None:
    """`sluice certs init`: the dev CA and service certificates."""
    certs = commands.add_parser("certs", help="manage the mesh's TLS material")
    certs_cmd = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    init = certs_cmd.add_parser(
        "init",
        help="create a dev CA and one certificate per service",
        description="Create certs/ca.crt and a certificate per service (edge, preprocess, inference, cache) "
        "with SANs for the given hostnames and spiffe://sluice/<service>. Keys are written 0600. "
        "Existing files are kept unless --force.",
    )
    add_config_flag(init)
    add_setting_flags(init, "certs_dir")
    init.add_argument(
        "--hostname",
        action="append",
        dest="hostnames",
        help="DNS name or IP the services are reached at (repeatable; default localhost and 127.0.0.1)",
    )
    init.add_argument("--force", action="store_true", help="replace existing CA and certificates")


def _add_keys(commands: argparse._SubParsersAction) -> None:
    """`sluice keys create|list|revoke`: the edge's API keys."""
    keys = commands.add_parser("keys", help="manage the edge's API keys")
    keys_cmd = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_cmd.add_parser(
        "create",
        help="create an API key and print it once",
        description="Create an API key for the edge (`Authorization: Bearer <key>`) and print it once: only a "
        "salted hash is stored in the keys file (written 0600). A running edge picks it up without a restart.",
    )
    create.add_argument("--name", required=True, help="who the key is for; appears in the audit log")
    create.add_argument("--rpm", type=_count, default=0, help="requests per minute (default 0: unlimited)")
    create.add_argument("--tpm", type=_count, default=0, help="prompt + completion tokens per minute (0: unlimited)")
    create.add_argument(
        "--models", type=comma_list, default=[], metavar="A,B", help="models the key may use (default: all)"
    )
    listing = keys_cmd.add_parser("list", help="list keys (names and limits; keys themselves are never stored)")
    revoke = keys_cmd.add_parser("revoke", help="delete a key; the edge refuses it from its next request on")
    revoke.add_argument("--name", required=True, help="the key to revoke")
    for command in (create, listing, revoke):
        add_config_flag(command)
        add_setting_flags(command, "keys_file")


def _add_model(commands: argparse._SubParsersAction) -> None:
    """`sluice model init|manifest`: model directories."""
    model = commands.add_parser("model", help="manage model directories")
    model_cmd = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    minit = model_cmd.add_parser(
        "init",
        help="build the small default model",
        description="Build a deterministic Llama-architecture model offline: byte-level BPE tokenizer trained on "
        "Python's stdlib, ChatML template, random weights under a fixed seed. Presets: default (vocab 4096, "
        "hidden 256, 4 layers, 5.3M parameters), bench (hidden 768, 12 layers, ~98M parameters) and qwen05 "
        "(Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14 heads over 2 KV heads, vocab 151,936; ~494M parameters).",
    )
    minit.add_argument("--preset", choices=sorted(PRESETS), default="default", help="model shape (default: default)")
    minit.add_argument(
        "--out", type=Path, help="target directory (default: models/sluice-tiny, or models/sluice-<preset>)"
    )
    minit.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    minit.add_argument("--force", action="store_true", help="rebuild even if the directory exists")
    manifest = model_cmd.add_parser(
        "manifest",
        help="write the SHA-256 manifest the inference service checks",
        description="Hash every file of a model directory (hidden files aside) into PATH/sluice-manifest.json. "
        "The inference service verifies it before loading and refuses a changed, missing or added file.",
    )
    manifest.add_argument("path", type=Path, help="the model directory")


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 0")
    return int(text)


def _model_spec(text: str) -> tuple[Path, str]:
    path, _, version = text.partition("@")
    if not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"{path!r} is not a model directory")
    return Path(path), version


def _replicas(text: str) -> dict[str, int]:
    from services.mesh.discovery.base import UPSTREAM_SERVICES

    counts = {}
    for item in text.split(","):
        service, _, count = item.partition("=")
        if service not in UPSTREAM_SERVICES or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected SERVICE=N with SERVICE one of {', '.join(UPSTREAM_SERVICES)} and N >= 1"
            )
        counts[service] = int(count)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "model" and args.model_command == "manifest":
        from services.inference.manifest import ManifestError, write_manifest

        try:
            print(write_manifest(args.path))
        except (ManifestError, OSError) as err:
            print(f"sluice model manifest: {err}", file=sys.stderr)
            return 1
        return 0
    if args.command == "model":
        from services.inference.default_model import build_default_model

        named = DEFAULT_MODEL if args.preset == "default" else DEFAULT_MODEL.with_name(f"sluice-{args.preset}")
        out = args.out or named
        print(build_default_model(out, seed=args.seed, shape=PRESETS[args.preset], force=args.force))
        return 0
    try:
        settings = settings_from_args(args)
    except ValidationError as err:
        parser.exit(2, f"sluice {args.command}: {settings_error(err)}\n")
    configure_logging(
        settings.log_level, args.command if args.command != "serve" else args.service, settings.log_format
    )
    if args.command == "certs":
        from services.mesh.rpc.certs import DEFAULT_HOSTNAMES, init_certs

        hostnames = tuple(args.hostnames) if args.hostnames else DEFAULT_HOSTNAMES
        for path in init_certs(settings.certs_dir, hostnames, force=args.force):
            print(path)
        return 0
    if args.command == "keys":
        return _keys(settings, args)
    if args.command == "status":
        return _status(settings, args, parser)
    if args.command == "health":
        from services.mesh.rpc.probe import probe

        port = getattr(settings, f"{args.service}_port")
        if not args.address and not port:
            parser.error(
                f"give --address or the {args.service} port (--{args.service}-port, SLUICE_{args.service.upper()}_PORT)"
            )
        return probe(settings, args.service, args.address or f"127.0.0.1:{port}", args.timeout_s)
    if args.command == "up":
        from services.inference.embedding_default import resolve_embedding_model
        from services.up import MeshPlan, up

        if any(args.replicas.get(svc, 1) > 1 and getattr(settings, f"{svc}_port") for svc in args.replicas):
            parser.error("--replicas needs the replicated services on free ports (leave their --*-port at 0)")
        embedding = resolve_embedding_model(settings.embedding_model)
        plan = MeshPlan(args.replicas, tuple(args.extra_models), embedding, args.with_envoy)
        return up(settings, plan, args.state_file, args.log_dir, args.startup_timeout)
    if args.command == "envoy-config":
        return _envoy_config(settings, args)
    return _serve(args.service, settings, args.ready_file)


def _envoy_config(settings: Settings, args: argparse.Namespace) -> int:
    from services.ingress.envoy_config import plan, render
    from services.ingress.envoy_runner import envoy_binary, validate

    try:
        text = render(plan(settings, args.edge_addr, args.internal_grpc))
    except ValueError as err:
        print(f"sluice envoy-config: {err}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
        return 0
    args.out.write_text(text)
    if args.validate:
        try:
            envoy_binary()
        except FileNotFoundError as err:
            print(f"{args.out} written, not validated: {err}", file=sys.stderr)
            return 0
        try:
            validate(args.out)
        except ValueError as err:
            print(err, file=sys.stderr)
            return 1
        print(f"{args.out} written and validated by Envoy", file=sys.stderr)
    return 0


def _status(settings: Settings, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from services import status

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scrape is noise here
    if settings.discovery == "consul":
        if not args.url:
            parser.error("with Consul discovery, give the edge's base URL: --url http://HOST:PORT/v1")

        def locate() -> tuple[str, list[status.Located]]:
            return args.url, status.from_consul(settings, args.url)
    else:
        if not args.state_file.exists():
            print(
                f"sluice status: {args.state_file} not found: is the mesh running (`sluice up` writes it)? "
                "Elsewhere give --state-file, or --discovery consul with --url",
                file=sys.stderr,
            )
            return 2

        def locate() -> tuple[str, list[status.Located]]:
            return status.from_state_file(args.state_file)

    probes = status.network_probes(settings)

    def snapshot() -> status.MeshStatus:
        base_url, located = locate()
        return status.gather(base_url, located, probes)

    if args.json:
        print(snapshot().to_json())
        return 0
    from rich.console import Console, Group
    from rich.live import Live

    console = Console()
    if not args.watch:
        for part in status.render(snapshot()):
            console.print(part)
        return 0
    with Live(console=console, auto_refresh=False) as live:
        try:
            while True:
                live.update(Group(*status.render(snapshot())), refresh=True)
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from services.edge_http.core import keys

    path = settings.keys_file
    if args.keys_command == "create":
        try:
            plain, record = keys.create(path, args.name, args.rpm, args.tpm, args.models)
        except ValueError as err:
            print(f"sluice keys create: {err}", file=sys.stderr)
            return 1
        print(plain)
        print(f"key {record.name!r} added to {path}; it is shown only this once", file=sys.stderr)
        return 0
    if args.keys_command == "revoke":
        try:
            keys.revoke(path, args.name)
        except KeyError as err:
            print(f"sluice keys revoke: {err.args[0]}", file=sys.stderr)
            return 1
        print(f"key {args.name!r} revoked", file=sys.stderr)
        return 0
    for record in keys.load(path).keys:
        limits = f"rpm={record.rpm or 'unlimited'} tpm={record.tpm or 'unlimited'}"
        print(f"{record.name}\t{limits}\tmodels={','.join(record.models) or 'all'}")
    return 0


def _serve(service: str, settings: Settings, ready_file: Path | None) -> int:
    from services.mesh.telemetry import init_tracing

    init_tracing(service)
    if service == "preprocess":
        from services.preprocess.server import run
    elif service == "inference":
        from services.inference.server import run
    elif service == "cache":
        from services.cache.server import run
    else:
        from services.edge_http.server import run
    code = run(settings, ready_file)
    # The service has drained and stopped; tearing down the interpreter (torch, transformers,
    # grpc's threads) takes seconds more and does nothing for anyone, so a drain never waits on it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
