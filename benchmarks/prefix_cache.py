"""Long shared prompts through the mesh with two inference replicas: prefix caching and
prefix-aware routing against a prefix-blind balancer, and what caching costs random traffic.

Part 1 (Dify-like traffic): six distinct system prompts of about 1,200 tokens, four questions
each, streamed one request at a time; each round asks every system prompt one question, in a
shuffled order (fixed seed). The first request of a system prompt is cold; the other three are
warm. Reported: TTFT p50 of warm and cold requests, p90 of warm ones (a warm request that
missed the cache is as slow as a cold one), and the share of warm requests' prompt tokens
that usage reports as cached, for the mesh with prefix-aware routing (the default) and with it
off (least-busy balancing). Every run uses system prompts no earlier run has seen.

Part 2 (random prompts): tokens/s of 16 streaming clients with unique prompts (as
concurrency.py), with prefix caching on and off; and the engine alone, in-process, on 16 unique
prompts at a time, with it on and off (less noisy than the whole mesh on two shared cores).

Contenders run alternated (A B A B …), the idle meshes frozen with SIGSTOP; medians reported.
The completion cache never answers (`Cache-Control: no-cache`).

    python benchmarks/prefix_cache.py [--preset default|bench] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai
from concurrency import LoadResult, Server, _pause, prompt, sluice_engine
from transformers import AutoTokenizer, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from meshproc import Mesh, start_mesh

from services.inference.default_model import PRESETS, build_default_model
from services.inference.engine import Engine
from services.inference.engine_api import GenerationRequest, SamplingConfig
from services.inference.loader import load_model
from services.inference.scheduler import EngineLimits
from services.mesh.rpc.certs import init_certs

NO_CACHE = {"Cache-Control": "no-cache"}
SYSTEMS, QUESTIONS, SYSTEM_TOKENS = 6, 4, 1200
_runs = itertools.count()


@dataclass
class SharedPromptRun:
    cold_ttft: list[float] = field(default_factory=list)
    warm_ttft: list[float] = field(default_factory=list)
    warm_prompt_tokens: int = 0
    warm_cached_tokens: int = 0

    @property
    def cached_share(self) -> float:
        return self.warm_cached_tokens / max(1, self.warm_prompt_tokens)


def system_prompts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Six system prompts of about SYSTEM_TOKENS tokens, distinct from their first token on."""
    run = next(_runs)
    prompts = []
    for s in range(SYSTEMS):
        words = random.Random(run * 100 + s).choices(
            ["policy", "customer", "refund", "shipping", "warranty", "order", "invoice", "account", "support"], k=2000
        )
        text = f"[{run}.{s}] You are the help desk assistant of shop {s}. Knowledge: " + " ".join(words)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:SYSTEM_TOKENS]
        prompts.append(tokenizer.decode(ids))
    return prompts


async def _ask(
    client: openai.AsyncOpenAI, model: str, system: str, question: str, tokens: int
) -> tuple[float, int, int]:
    """(TTFT, prompt tokens, cached tokens) of one streamed chat."""
    started = time.perf_counter()
    first, usage = None, None
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=NO_CACHE,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        usage = chunk.usage or usage
    if first is None or usage is None:
        raise RuntimeError("a stream ended without text or usage")
    return first - started, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens


async def _shared_prompts(mesh: Mesh, model: str, systems: list[str], tokens: int) -> SharedPromptRun:
    result = SharedPromptRun()
    order = random.Random(7)
    async with openai.AsyncOpenAI(base_url=mesh.base_url, api_key="unused", max_retries=0, timeout=600) as client:
        for question in range(QUESTIONS):
            for s in order.sample(range(SYSTEMS), SYSTEMS):
                ttft, prompt, cached = await _ask(
                    client, model, systems[s], f"Question {question}: can I return it?", tokens
                )
                if question == 0:
                    result.cold_ttft.append(ttft)
                else:
                    result.warm_ttft.append(ttft)
                    result.warm_prompt_tokens += prompt
                    result.warm_cached_tokens += cached
    return result


def engine_on_off(model_dir: Path, repeats: int) -> dict[str, list[float]]:
    """tokens/s of the engine in-process with prefix caching on and off, alternated, on 16
    prompts no earlier run has seen."""
    engines = {
        "on": Engine(load_model(model_dir, "cpu")),
        "off": Engine(load_model(model_dir, "cpu"), EngineLimits(prefix_caching=False)),
    }
    tokenizer = engines["on"].loaded.tokenizer
    greedy = SamplingConfig(temperature=0, ignore_eos=True)

    def run(engine: Engine) -> float:
        prompts = [tokenizer(prompt(), add_special_tokens=False)["input_ids"] for _ in range(16)]
        started = time.perf_counter()
        handles = [engine.submit(GenerationRequest(f"u{i}", p, 64, greedy)) for i, p in enumerate(prompts)]
        total = sum(len(step.token_ids) for handle in handles for step in handle)
        return total / (time.perf_counter() - started)

    for engine in engines.values():
        sluice_engine(engine, 16, 8)  # warm-up
    results: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            results[name].append(run(engine))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="model to measure")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of the contenders (default 3)")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens of the shared-prompt requests (default 16)")
    parser.add_argument("--clients", type=int, default=16, help="streaming clients of the random-prompt load")
    parser.add_argument("--engine-repeats", type=int, default=9, help="in-process on/off alternations (default 9)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"building the {args.preset} model…", flush=True)
        model_dir = build_default_model(work / f"sluice-{args.preset}", shape=PRESETS[args.preset])
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        print("the engine in-process, prefix caching on and off…", flush=True)
        in_process = engine_on_off(model_dir, args.engine_repeats)
        certs = work / "certs"
        init_certs(certs)
        contenders = {
            "prefix routing": {},
            "least busy": {"SLUICE_PREFIX_ROUTING": "false"},
            "no prefix caching": {"SLUICE_PREFIX_CACHING": "false"},
        }
        meshes: dict[str, Mesh] = {}
        try:
            for name, env in contenders.items():
                print(f"starting the mesh ({name}, two inference replicas)…", flush=True)
                (work / name).mkdir()
                meshes[name] = start_mesh(work / name, certs, model_dir, "--replicas", "inference=2", env=env)
                _pause(meshes[name].process, True)
            shared: dict[str, list[SharedPromptRun]] = {}
            load: dict[str, list[LoadResult]] = {}
            extra = {"extra_body": {"ignore_eos": True}, "extra_headers": NO_CACHE}
            for repeat in range(args.repeats):
                for name in ("prefix routing", "least busy"):
                    mesh = meshes[name]
                    _pause(mesh.process, False)
                    run = asyncio.run(_shared_prompts(mesh, model_dir.name, system_prompts(tokenizer), args.tokens))
                    shared.setdefault(name, []).append(run)
                    _pause(mesh.process, True)
                for name in ("prefix routing", "no prefix caching"):
                    mesh = meshes[name]
                    _pause(mesh.process, False)
                    server = Server(name, mesh.base_url, model_dir.name, extra)
                    load.setdefault(name, []).append(server.load(args.clients, 64, 2))
                    _pause(mesh.process, True)
                print(f"  repeat {repeat + 1} of {args.repeats} done", flush=True)
        finally:
            for mesh in meshes.values():
                _pause(mesh.process, False)
                mesh.stop()

    median = statistics.median
    print(f"\n{args.preset} model, two inference replicas, medians of {args.repeats} alternated runs\n")
    print(f"{SYSTEMS} system prompts of {SYSTEM_TOKENS} tokens x {QUESTIONS} questions, one request at a time")
    print(
        f"{'balancing':16} {'cold TTFT':>10} {'warm TTFT':>10} {'warm/cold':>9} {'warm p90':>9} "
        f"{'warm tokens cached':>19}"
    )
    for name, runs in shared.items():
        cold = median([median(r.cold_ttft) for r in runs])
        warm = median([median(r.warm_ttft) for r in runs])
        p90 = median([statistics.quantiles(r.warm_ttft, n=10)[-1] for r in runs])
        share = median([r.cached_share for r in runs])
        print(f"{name:16} {cold * 1e3:8.0f}ms {warm * 1e3:8.0f}ms {warm / cold:8.2f}x {p90 * 1e3:7.0f}ms {share:18.0%}")
    print(f"\nrandom prompts, {args.clients} streaming clients, 64 new tokens")
    print(f"{'engine':18} {'tokens/s':>9} {'TTFT p50':>9}")
    for name, runs in load.items():
        print(
            f"{name:18} {median([r.tokens_per_s for r in runs]):9.0f} {median([r.ttft_p50 for r in runs]) * 1e3:7.0f}ms"
        )
    on = median([r.tokens_per_s for r in load["prefix routing"]])
    off = median([r.tokens_per_s for r in load["no prefix caching"]])
    print(f"caching on / off: {on / off:.2f}x")
    engine_on, engine_off = (median(in_process[name]) for name in ("on", "off"))
    print(
        f"engine in-process, 16 unique prompts, medians of {args.engine_repeats}: on {engine_on:.0f}, "
        f"off {engine_off:.0f} tokens/s: {engine_on / engine_off:.2f}x"
    )


if __name__ == "__main__":
    main()
