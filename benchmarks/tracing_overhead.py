"""What tracing costs: the same concurrent streaming load through the mesh with tracing off
and on (every span exported over OTLP/gRPC to a real receiver started here), side by side.

Runs alternate off/on `--repeats` times so drift on a noisy machine hits both sides alike.

    python benchmarks/tracing_overhead.py [--clients 16] [--tokens 64] [--rounds 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from concurrency import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from meshproc import start_mesh
from otlp_receiver import OtlpReceiver

from services.inference.default_model import build_default_model
from services.mesh.rpc.certs import init_certs


def measure(work: Path, certs: Path, model_dir: Path, env: dict[str, str], args: argparse.Namespace) -> float:
    work.mkdir()
    mesh = start_mesh(work, certs, model_dir, env=env)
    try:
        extra = {"extra_body": {"ignore_eos": True}, "extra_headers": {"Cache-Control": "no-cache"}}
        load(mesh.base_url, model_dir.name, 1, 8, 1, extra)  # warm-up
        result = load(mesh.base_url, model_dir.name, args.clients, args.tokens, args.rounds, extra)
        if result.errors:
            raise RuntimeError(f"{result.errors} requests failed")
        return result.tokens_per_s
    finally:
        mesh.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default 16)")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request (default 64)")
    parser.add_argument("--rounds", type=int, default=4, help="requests per client per run (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="off/on pairs (default 2)")
    args = parser.parse_args()

    results: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp, OtlpReceiver() as receiver:
        work = Path(tmp)
        model_dir = build_default_model(work / "sluice-tiny")
        certs = work / "certs"
        init_certs(certs)
        traced = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        for repeat in range(args.repeats):
            for mode, env in (("off", {}), ("on", traced)):
                print(f"run {repeat + 1}/{args.repeats}, tracing {mode}…", flush=True)
                results[mode].append(measure(work / f"{mode}{repeat}", certs, model_dir, env, args))
        spans = len(receiver.spans())

    print(f"\n{args.clients} streaming clients, {args.tokens} tokens, {args.rounds} requests each, default model")
    print(f"{'tracing':8} {'runs (tokens/s)':>30} {'median':>8}")
    for mode, values in results.items():
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"{mode:8} {runs:>30} {statistics.median(values):8.0f}")
    ratio = statistics.median(results["on"]) / statistics.median(results["off"])
    print(f"on/off throughput: {ratio:.3f}x ({spans} spans received)")


if __name__ == "__main__":
    main()
