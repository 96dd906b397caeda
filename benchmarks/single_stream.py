"""Single-request throughput: through the whole mesh vs the model in-process, side by side in one run.

Prints a table. Usage: `make bench` or `python benchmarks/single_stream.py [--tokens N] [--runs N]`.
The mesh is started with the real `sluice up` (mTLS, separate processes) via the test helper.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import openai
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from meshproc import start_mesh

from services.inference.default_model import build_default_model
from services.inference.engine import Engine
from services.inference.engine_api import GenerationRequest, SamplingConfig
from services.inference.loader import load_model
from services.mesh.rpc.certs import init_certs

MESSAGES = [{"role": "user", "content": "Write a long story about a river and a sluice gate."}]


def _median_rate(runs: int, tokens: int, once: Callable[[], float | None]) -> tuple[float, float | None]:
    """Median tokens/s over runs, and median time to first token when `once` reports one."""
    rates, firsts = [], []
    for _ in range(runs):
        started = time.perf_counter()
        first = once()
        rates.append(tokens / (time.perf_counter() - started))
        if first is not None:
            firsts.append(first - started)
    return statistics.median(rates), (statistics.median(firsts) if firsts else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=256, help="tokens generated per request (default 256)")
    parser.add_argument("--runs", type=int, default=5, help="runs per row; the median is reported (default 5)")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_default_model(work / "sluice-tiny")
        certs = work / "certs"
        init_certs(certs)
        loaded = load_model(model_dir, "cpu")
        prompt = loaded.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        engine = Engine(loaded)
        greedy = SamplingConfig(temperature=0)

        def engine_once() -> float:
            handle = engine.submit(GenerationRequest("bench", ids, args.tokens, greedy))
            steps = iter(handle)
            next(steps)
            first = time.perf_counter()
            for _ in steps:
                pass
            return first

        def generate_once() -> None:
            with torch.inference_mode():
                loaded.model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=args.tokens,
                    min_new_tokens=args.tokens,
                    do_sample=False,
                    pad_token_id=0,
                )

        started = time.perf_counter()
        mesh = start_mesh(work, certs, model_dir)
        up_seconds = time.perf_counter() - started
        try:
            client = openai.OpenAI(base_url=mesh.base_url, api_key="unused", max_retries=0, timeout=300)

            def edge_once() -> float:
                first = None
                stream = client.chat.completions.create(
                    model="sluice-tiny",
                    messages=MESSAGES,
                    max_tokens=args.tokens,
                    temperature=0,
                    stream=True,
                    extra_headers={"Cache-Control": "no-cache"},
                )
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter()
                return first

            edge_once()  # warm-up: first request pays for lazy initialisation
            engine_once()
            rows = [
                ("model.generate in-process (transformers)", *_median_rate(args.runs, args.tokens, generate_once)),
                ("Sluice engine in-process", *_median_rate(args.runs, args.tokens, engine_once)),
                ("through the edge (openai SDK, SSE, mTLS mesh)", *_median_rate(args.runs, args.tokens, edge_once)),
            ]
        finally:
            mesh.stop()

    threads = torch.get_num_threads()
    print(f"\nsingle request, greedy, {args.tokens} new tokens, median of {args.runs} runs, {threads} torch threads")
    print(f"{'path':48} {'tokens/s':>10} {'TTFT ms':>9}")
    for name, rate, first in rows:
        print(f"{name:48} {rate:10.1f} {first * 1000 if first else float('nan'):9.1f}")
    print(f"edge / engine in-process: {rows[2][1] / rows[1][1]:.2f}x")
    print(f"time from `sluice up` to healthy (model and certs already built): {up_seconds:.1f}s")


if __name__ == "__main__":
    main()
