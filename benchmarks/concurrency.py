"""Throughput and latency under concurrent streaming load, side by side in one run.

Drives the running mesh through the edge with the official openai async client (closed
loop: N clients, each sending streaming chats back to back; fixed prompts; greedy; EOS
ignored) at several concurrencies, and on the same model measures (a) sequential in-process
`model.generate`, (b) Sluice's engine in-process without the mesh, (c) `transformers serve
--continuous-batching` with a bounded cache, started here on a free port and driven by the
same load generator. Prints a table and every ratio.

    python benchmarks/concurrency.py [--preset default|bench] [--concurrency 1,4,16,32]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from meshproc import start_mesh

from services.inference.default_model import PRESETS, build_default_model
from services.inference.engine import Engine, GenerationRequest
from services.inference.loader import load_model
from services.inference.sampling import SamplingConfig
from services.mesh.certs import init_certs

PROMPTS = [f"Story {i}: the river reached the sluice gate and" for i in range(32)]


@dataclass
class LoadResult:
    tokens_per_s: float
    ttft_p50: float
    ttft_p95: float
    itl_p50: float
    errors: int


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values or [float("nan")])[0]


async def _load(base_url: str, model: str, concurrency: int, tokens: int, rounds: int, extra: dict) -> LoadResult:
    ttfts: list[float] = []
    itls: list[float] = []
    generated = 0
    errors = 0

    async def client_loop(client: openai.AsyncOpenAI, index: int) -> None:
        nonlocal generated, errors
        for round_ in range(rounds):
            prompt = PROMPTS[(index + round_) % len(PROMPTS)]
            started = time.perf_counter()
            first = last = None
            count = 0
            try:
                stream = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                    **extra,
                )
                async for chunk in stream:
                    if chunk.usage:
                        count = chunk.usage.completion_tokens
                    if chunk.choices and chunk.choices[0].delta.content:
                        last = time.perf_counter()
                        first = first or last
            except openai.OpenAIError:
                errors += 1
                continue
            if first is None:
                errors += 1
                continue
            generated += count
            ttfts.append(first - started)
            if count > 1:
                itls.append((last - first) / (count - 1))

    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return LoadResult(generated / elapsed, _pct(ttfts, 50), _pct(ttfts, 95), _pct(itls, 50), errors)


def load(base_url: str, model: str, concurrency: int, tokens: int, rounds: int, extra: dict) -> LoadResult:
    return asyncio.run(_load(base_url, model, concurrency, tokens, rounds, extra))


def sequential_generate(model_dir: Path, prompts: list[list[int]], tokens: int) -> float:
    model = load_model(model_dir, "cpu").model
    started = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            model.generate(
                torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
            )
    return len(prompts) * tokens / (time.perf_counter() - started)


def engine_in_process(model_dir: Path, prompts: list[list[int]], tokens: int) -> float:
    engine = Engine(load_model(model_dir, "cpu"))
    greedy = SamplingConfig(temperature=0, ignore_eos=True)
    started = time.perf_counter()
    handles = [engine.submit(GenerationRequest(f"b{i}", ids, tokens, greedy)) for i, ids in enumerate(prompts)]
    total = sum(len(step.token_ids) for handle in handles for step in handle)
    return total / (time.perf_counter() - started)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def transformers_serve(model_dir: Path, work: Path, concurrency: list[int], tokens: int, rounds: int) -> dict:
    port = _free_port()
    transformers_cli = str(Path(sys.executable).with_name("transformers"))
    batching = ["--continuous-batching", "--cb-num-blocks", "32", "--cb-max-batch-tokens", "1024"]
    argv = [transformers_cli, "serve", *batching, "--host", "127.0.0.1", "--port", str(port), str(model_dir)]
    log = (work / "transformers-serve.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            tail = (work / "transformers-serve.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"transformers serve did not start:\n{tail}")
        base = f"http://127.0.0.1:{port}/v1"
        load(base, str(model_dir), 1, 8, 1, {})  # warm-up
        return {c: load(base, str(model_dir), c, tokens, rounds, {}) for c in concurrency}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="model to measure")
    parser.add_argument("--concurrency", default="1,4,16,32", help="comma-separated client counts")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level (default 2)")
    parser.add_argument("--torch-threads", type=int, default=0, help="the mesh's torch_threads setting (0: default)")
    parser.add_argument("--skip-peer", action="store_true", help="do not start transformers serve")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"building the {args.preset} model…", flush=True)
        model_dir = build_default_model(work / f"sluice-{args.preset}", shape=PRESETS[args.preset])
        tokenizer = load_model(model_dir, "cpu").tokenizer
        chats = [[{"role": "user", "content": p}] for p in PROMPTS[:16]]
        prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        print("in-process baselines…", flush=True)
        sequential = sequential_generate(model_dir, ids, args.tokens)
        engine16 = engine_in_process(model_dir, ids, args.tokens)

        certs = work / "certs"
        init_certs(certs)
        print("the Sluice mesh…", flush=True)
        mesh = start_mesh(work, certs, model_dir, "--torch-threads", str(args.torch_threads))
        try:
            extra = {"extra_body": {"ignore_eos": True}, "extra_headers": {"Cache-Control": "no-cache"}}
            load(mesh.base_url, model_dir.name, 1, 8, 1, extra)  # warm-up
            ours = {c: load(mesh.base_url, model_dir.name, c, args.tokens, args.rounds, extra) for c in levels}
        finally:
            mesh.stop()
        peer = {}
        if not args.skip_peer:
            print("transformers serve --continuous-batching…", flush=True)
            try:
                peer = transformers_serve(model_dir, work, levels, args.tokens, args.rounds)
            except RuntimeError as err:
                print(f"peer skipped: {err}", flush=True)

    print(
        f"\n{args.preset} model, {args.tokens} new tokens, greedy, {args.rounds} requests per client, "
        f"mesh torch_threads {args.torch_threads}"
    )
    print(f"sequential model.generate in-process: {sequential:8.0f} tokens/s")
    print(f"Sluice engine in-process, 16 at once: {engine16:8.0f} tokens/s")
    print(f"{'server':22} {'clients':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'errors':>6}")
    for name, results in (("sluice mesh", ours), ("transformers serve cb", peer)):
        for c, r in results.items():
            print(
                f"{name:22} {c:7d} {r.tokens_per_s:9.0f} {r.ttft_p50 * 1e3:7.0f}ms {r.ttft_p95 * 1e3:7.0f}ms "
                f"{r.itl_p50 * 1e3:6.1f}ms {r.errors:6d}"
            )
    for c, r in ours.items():
        line = (
            f"c={c}: mesh/sequential {r.tokens_per_s / sequential:.2f}x, mesh/engine {r.tokens_per_s / engine16:.2f}x"
        )
        if c in peer:
            line += f", mesh/transformers-serve {r.tokens_per_s / peer[c].tokens_per_s:.2f}x"
            line += f", TTFT p50 mesh/peer {r.ttft_p50 / peer[c].ttft_p50:.2f}x"
        print(line)


if __name__ == "__main__":
    main()
