"""Structured output's cost: free text vs JSON-constrained generation on one in-process engine,
side by side in one run, plus the time spent in the grammar (mask, closure) per constrained token.

Prints a table. Usage: `python benchmarks/structured_output.py [--clients N] [--tokens N] [--runs N]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from services.inference import structured
from services.inference.default_model import build_default_model
from services.inference.engine import Engine
from services.inference.engine_api import GenerationRequest, SamplingConfig
from services.inference.loader import load_model

SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "pages": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["title", "pages", "tags"],
    }
)


class GrammarClock:
    """Time spent inside JsonMatcher.next_token apart from the sampler it calls (which free text
    pays too): masks, closures, forced tokens. And how many tokens it chose."""

    def __init__(self) -> None:
        self.seconds, self.tokens = 0.0, 0
        original = structured.JsonMatcher.next_token

        def timed(matcher: structured.JsonMatcher, sample: Callable[[torch.Tensor], int], *args: object) -> int:
            sampling = 0.0

            def timed_sample(logits: torch.Tensor) -> int:
                nonlocal sampling
                started = time.perf_counter()
                try:
                    return sample(logits)
                finally:
                    sampling += time.perf_counter() - started

            started = time.perf_counter()
            try:
                return original(matcher, timed_sample, *args)
            finally:
                self.seconds += time.perf_counter() - started - sampling
                self.tokens += 1

        structured.JsonMatcher.next_token = timed  # type: ignore[method-assign]


def _batch(engine: Engine, prompt: list[int], clients: int, tokens: int, schema: str | None) -> tuple[float, int]:
    """One batch of concurrent requests: (seconds, tokens generated)."""
    started = time.perf_counter()
    sampling = [SamplingConfig(temperature=1.0, seed=i, ignore_eos=True) for i in range(clients)]
    handles = [
        engine.submit(GenerationRequest(f"r{i}", prompt, tokens, sampling[i], json_schema=schema))
        for i in range(clients)
    ]
    generated = 0
    for handle in handles:
        steps = list(handle)
        generated += steps[-1].completion_tokens
        if schema is not None:
            json.loads("".join(step.text for step in steps))  # only worth reading if the output is JSON
    return time.perf_counter() - started, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16, help="concurrent requests per batch (default 16)")
    parser.add_argument("--tokens", type=int, default=96, help="max_tokens per request (default 96)")
    parser.add_argument("--runs", type=int, default=5, help="batches per row, alternating; median reported")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(load_model(build_default_model(Path(tmp) / "sluice-tiny"), "cpu"))
        prompt = engine.loaded.tokenizer("Describe a book as JSON:", add_special_tokens=False)["input_ids"]
        clock = GrammarClock()
        rows: dict[str, list[float]] = {"free text": [], "json_object": [], "json_schema": []}
        lengths: dict[str, list[int]] = {name: [] for name in rows}
        schemas = {"free text": None, "json_object": '{"type":"object"}', "json_schema": SCHEMA}
        for _ in range(args.runs):
            for name, schema in schemas.items():  # alternating rows share the machine's noise
                seconds, generated = _batch(engine, prompt, args.clients, args.tokens, schema)
                rows[name].append(generated / seconds)
                lengths[name].append(generated)
    free = statistics.median(rows["free text"])
    print(f"{args.clients} concurrent requests, max_tokens {args.tokens}, default model, median of {args.runs}")
    print(f"{'row':<12} {'tokens/s':>9} {'vs free':>8} {'tokens/request':>15}")
    for name, rates in rows.items():
        rate = statistics.median(rates)
        mean_length = statistics.mean(lengths[name]) / args.clients
        print(f"{name:<12} {rate:>9.0f} {rate / free:>7.2f}x {mean_length:>15.1f}")
    print(f"grammar time per constrained token, sampling excluded: {clock.seconds / max(clock.tokens, 1) * 1e3:.3f} ms")
    print("(JSON requests end when their JSON does: fewer rows per step, so lower tokens/s at equal cost per row)")


if __name__ == "__main__":
    main()
