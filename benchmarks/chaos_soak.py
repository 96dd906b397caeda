"""Chaos soak: mixed streaming load against `sluice up --replicas inference=2` while a random
backend is killed with SIGKILL every 20-40 s. Prints what happened to every request and every
kill.

Each request is a streaming chat with a unique prompt (greedy, so the cache is asked and
misses, and stores); clients run closed-loop. A request ends as one of:

- served: finished with its usage;
- failed before its first token: an HTTP error (503 with Retry-After when a service the
  request needs has no instance left), split by whether a replica of every service it needs
  was alive (the target is 0 there) or not;
- failed after its first token with an SSE error event (its instance died mid-stream);
- hung: no answer within --request-timeout (the target is 0);
- truncated: ended without an error and without its tokens (must never happen).

One child is killed at a time, and the next kill waits until the last victim is back, so every
kill meets a mesh whose other children are healthy.

    python benchmarks/chaos_soak.py [--minutes 10] [--clients 8] [--replicas inference=2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from meshproc import Mesh, start_mesh, streamed_outcome

from services.inference.default_model import build_default_model
from services.mesh.rpc.certs import init_certs

# The services a chat request cannot do without (the cache down means misses).
REQUIRED = ("preprocess", "inference")
REPORTED = {
    "completed": "served",
    "failed before tokens": "failed before first token",
    "error after tokens": "failed after first token (error event)",
    "hung": "hung",
    "truncated": "truncated",
}


@dataclass
class Outage:
    child: str
    service: str
    killed_at: float
    back_at: float | None = None


@dataclass
class Soak:
    outages: list[Outage] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)  # failures before the first token: (status, message)

    def uncovered(self, started: float, ended: float, replicas: dict[str, int]) -> bool:
        """Was some required service without any instance during [started, ended]?"""
        overlapping = [o for o in self.outages if o.killed_at <= ended and (o.back_at or ended) >= started]
        down = Counter(o.service for o in overlapping)
        return any(down[service] >= replicas.get(service, 1) for service in REQUIRED)


def _service(child: str) -> str:
    return child.split("-", 1)[0]


async def _load(mesh: Mesh, soak: Soak, args: argparse.Namespace, until: float, replicas: dict[str, int]) -> None:
    async def client_loop(client: openai.AsyncOpenAI) -> None:
        while time.monotonic() < until:
            started = time.monotonic()
            content = f"soak {uuid.uuid4()}"
            ended = await streamed_outcome(client, mesh.model_dir.name, content, args.tokens, args.request_timeout)
            outcome, reason = REPORTED[ended.kind], ended.reason
            if outcome == "failed before first token":
                uncovered = soak.uncovered(started, time.monotonic(), replicas)
                outcome += " (a required service had no instance)" if uncovered else " (every service had a replica)"
                if not uncovered:
                    soak.reasons[reason] += 1
                await asyncio.sleep(1.0)  # as a client honouring Retry-After would
            soak.outcomes[outcome] += 1

    async with openai.AsyncOpenAI(base_url=mesh.base_url, api_key="unused", max_retries=0, timeout=60) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(args.clients)))


async def _chaos(mesh: Mesh, soak: Soak, args: argparse.Namespace, until: float, rng: random.Random) -> None:
    victims = [name for name, info in mesh.services.items() if info["service"] != "edge"]
    while True:
        await asyncio.sleep(rng.uniform(args.kill_min_s, args.kill_max_s))
        if time.monotonic() >= until - 5:
            return
        victim = rng.choice(victims)
        pid = mesh.child(victim)["pid"]
        os.kill(pid, signal.SIGKILL)
        outage = Outage(victim, _service(victim), time.monotonic())
        soak.outages.append(outage)
        print(f"{time.monotonic() - args.started:6.0f}s  killed {victim} (pid {pid})", flush=True)
        # Back: restarted, and SERVING as the edge sees it (the outage lasts until clients can use it).
        while (state := mesh.child(victim))["pid"] == pid or state["state"] != "running" or not await _serving(mesh):
            if mesh.process.poll() is not None:
                raise RuntimeError(f"sluice up exited with {mesh.process.returncode}:\n{mesh.logs()}")
            await asyncio.sleep(0.1)
        outage.back_at = time.monotonic()
        print(f"{outage.back_at - args.started:6.0f}s  {victim} is back after {outage.back_at - outage.killed_at:.1f}s")


async def _serving(mesh: Mesh) -> bool:
    """Every instance SERVING according to the edge's /health."""
    reply = await asyncio.to_thread(mesh.health)
    return reply.status_code == 200 and reply.json()["status"] == "ok"


async def _soak(mesh: Mesh, args: argparse.Namespace, replicas: dict[str, int]) -> Soak:
    soak = Soak()
    until = time.monotonic() + args.minutes * 60
    rng = random.Random(args.seed)
    await asyncio.gather(_load(mesh, soak, args, until, replicas), _chaos(mesh, soak, args, until, rng))
    return soak


def _report(soak: Soak, mesh: Mesh, args: argparse.Namespace) -> None:
    state = mesh.state()["services"]
    kills = Counter(o.child for o in soak.outages)
    shape = f"{args.clients} clients, {args.tokens} tokens, --replicas {args.replicas}"
    print(f"\n## Chaos soak: {args.minutes:g} min, {shape}\n")
    print("| outcome | requests |\n| --- | --- |")
    for outcome in (
        "served",
        "failed before first token (every service had a replica)",
        "failed before first token (a required service had no instance)",
        "failed after first token (error event)",
        "hung",
        "truncated",
    ):
        print(f"| {outcome} | {soak.outcomes[outcome]} |")
    print("\n| child | killed | restarted | state |\n| --- | --- | --- | --- |")
    for name, info in state.items():
        print(f"| {name} | {kills[name]} | {info['restarts']} | {info['state']} |")
    if soak.reasons:
        print("\nfailed before first token while every service had a replica, by answer:")
        for reason, count in soak.reasons.most_common():
            print(f"  {count:4d}  {reason}")
    back = [o.back_at - o.killed_at for o in soak.outages if o.back_at is not None]
    if back:
        median, longest = statistics.median(back), max(back)
        print(f"\nserving again as the edge sees it, after a kill: median {median:.1f}s, max {longest:.1f}s")
    every_restarted = all(state[name]["restarts"] == count for name, count in kills.items())
    print(f"every killed child restarted: {'yes' if every_restarted else 'NO'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default 8)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per request (default 48)")
    parser.add_argument("--replicas", default="inference=2", help="sluice up --replicas (default inference=2)")
    parser.add_argument("--kill-min-s", type=float, default=20.0, help="shortest wait between kills (default 20)")
    parser.add_argument("--kill-max-s", type=float, default=40.0, help="longest wait between kills (default 40)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="a request slower than this hung")
    parser.add_argument("--seed", type=int, default=0, help="seed for the victims and the waits")
    args = parser.parse_args()
    replicas = {service: int(n) for service, n in (item.split("=") for item in args.replicas.split(","))}
    with tempfile.TemporaryDirectory(prefix="sluice-soak-") as tmp:
        work = Path(tmp)
        certs = work / "certs"
        init_certs(certs)
        model = build_default_model(work / "models" / "sluice-tiny")
        (work / "mesh").mkdir()
        mesh = start_mesh(work / "mesh", certs, model, "--replicas", args.replicas)
        try:
            args.started = time.monotonic()
            print(f"mesh up at {mesh.base_url}: {', '.join(mesh.services)}", flush=True)
            soak = asyncio.run(_soak(mesh, args, replicas))
            _report(soak, mesh, args)
        finally:
            code = mesh.stop()
            print(f"sluice up exited with {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
