"""Where a decode step of the built-in engine spends its time, at a given number of rows.

The engine's parts are driven in this process, on this thread, exactly as the engine loop drives
them (scheduler → model runner → scheduler → output processing), with N sequences that have
finished their prompts and decode together. Each step is timed by phase (scheduling, the model
runner, block indexing, output processing); then the same steps run under torch's profiler,
with ranges opened around the model's parts, and every op's own CPU time is charged to the
innermost part it ran in: linear layers of attention and MLP, the attention kernel (KV writes,
gathers, masks, products, softmax), norms, rotary embedding (the attention module's own ops),
the LM head, sampling and log probabilities. What the profiler saw of no op is Python.

    python benchmarks/step_profile.py [--preset bench] [--rows 16,32] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.autograd.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.inference.default_model import PRESETS, build_default_model
from services.inference.detokenize import direct_decoder
from services.inference.engine_api import GenerationRequest, SamplingConfig
from services.inference.kv_blocks import BlockPool
from services.inference.loader import LoadedModel, load_model
from services.inference.model_runner import ModelRunner
from services.inference.output import SequenceOutput
from services.inference.paged_attention import kv_geometry
from services.inference.prefix_cache import BlockCache
from services.inference.scheduler import EngineLimits, Scheduler
from services.inference.sequences import Sequence, SequenceHandle
from services.mesh.contracts.prefix_hash import root_hash

PHASES = ("schedule", "model runner", "indexing", "output")


class Harness:
    """The engine's parts, stepped by hand."""

    def __init__(self, loaded: LoadedModel, limits: EngineLimits) -> None:
        geometry = kv_geometry(loaded.model)
        blocks = limits.kv_cache_bytes // (geometry.bytes_per_token(loaded.model.dtype) * limits.kv_block_size)
        self.loaded = loaded
        self.scheduler = Scheduler(limits, BlockCache(BlockPool(blocks), enabled=False), root_hash("profile"))
        self.runner = ModelRunner(loaded, blocks, limits)
        self.decoder = direct_decoder(loaded.tokenizer)
        self.outputs: dict[Sequence, SequenceOutput] = {}

    def submit(self, rows: int, prompt_tokens: int, max_tokens: int) -> None:
        vocab = self.runner.vocab_size
        greedy = SamplingConfig(temperature=0, ignore_eos=True)
        for i in range(rows):
            prompt = [(7 * i + 13 * k) % (vocab - 10) + 5 for k in range(prompt_tokens)]
            self.scheduler.add(SequenceHandle(GenerationRequest(f"p{i}", prompt, max_tokens, greedy)))
        admitted, _ = self.scheduler.admit()
        for seq in admitted:
            self.runner.add(seq)
            self.outputs[seq] = SequenceOutput(seq.request, self.decoder, self.loaded.eos_token_ids, None)

    def step(self, timings: dict[str, list[float]] | None = None) -> int:
        """One engine step; returns the rows it decoded (0 while any prompt is still prefilling)."""
        clock = time.perf_counter
        started = clock()
        plan = self.scheduler.schedule()
        assert plan is not None
        scheduled = clock()
        output = self.runner.execute(plan)
        ran = clock()
        self.scheduler.computed(plan)
        indexed = clock()
        for index, (seq, _) in enumerate(plan.sampled):
            token = output.tokens[index]
            seq.output_ids.append(token)
            self.outputs[seq].add(token, seq.generated)
        done = clock()
        if timings is not None:
            spans = (scheduled - started, ran - scheduled, indexed - ran, done - indexed)
            for phase, seconds in zip(PHASES, spans, strict=True):
                timings[phase].append(seconds)
        return 0 if plan.prefill else len(plan.sampled)


def _model_ranges(model: torch.nn.Module, runner: ModelRunner) -> Callable[[], None]:
    """Open a profiler range around each part of the model while it runs; returns the undo."""
    names = {
        "mlp": lambda name: name.endswith(".mlp"),
        "attention": lambda name: name.endswith(".self_attn"),
        "linear (attention)": lambda name: ".self_attn." in name and name.endswith("_proj"),
        "norms": lambda name: name.endswith("norm"),
        "embedding": lambda name: name.endswith("embed_tokens"),
        "LM head": lambda name: name == "lm_head",
    }
    handles = []
    for name, module in model.named_modules():
        part = next((label for label, matches in names.items() if matches(name)), None)
        if part is None:
            continue
        ranges: list = []
        handles.append(module.register_forward_pre_hook(lambda *_, p=part, r=ranges: r.append(_enter(p))))
        handles.append(module.register_forward_hook(lambda *_, r=ranges: r.pop().__exit__(None, None, None)))
    # transformers calls the attention object itself: its class's __call__ is what to wrap.
    attention_class = type(runner._attention)
    kernel, sample = attention_class.__call__, runner._sample

    def ranged_kernel(*args: object, **kwargs: object) -> object:
        with record_function("attention kernel"):
            return kernel(*args, **kwargs)

    def ranged_sample(*args: object, **kwargs: object) -> object:
        with record_function("sampling"):
            return sample(*args, **kwargs)

    attention_class.__call__ = ranged_kernel  # type: ignore[method-assign]
    runner._sample = ranged_sample  # type: ignore[method-assign]

    def undo() -> None:
        for handle in handles:
            handle.remove()
        attention_class.__call__ = kernel  # type: ignore[method-assign]
        runner._sample = sample  # type: ignore[method-assign]

    return undo


def _enter(name: str):  # -> record_function
    ranged = record_function(name)
    ranged.__enter__()
    return ranged


@contextmanager
def profiled() -> Iterator[torch.profiler.profile]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yield prof


RENAME = {"attention": "rotary and attention glue", "mlp": "MLP (linear, activation)"}


def _by_part(prof: torch.profiler.profile) -> dict[str, float]:
    """Every op's own CPU time (µs), charged to the innermost range it ran in."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.is_user_annotation if hasattr(event, "is_user_annotation") else False:
            continue
        if event.name.startswith("aten::") or event.name.startswith("mkldnn"):
            parent, part = event.cpu_parent, "outside the model"
            while parent is not None:
                if not (parent.name.startswith("aten::") or parent.name.startswith("mkldnn")):
                    part = parent.name
                    break
                parent = parent.cpu_parent
            totals[RENAME.get(part, part)] += event.self_cpu_time_total
    return totals


def profile_rows(
    loaded: LoadedModel, rows: int, steps: int, prompt_tokens: int, prepack: bool
) -> tuple[dict, dict, str]:
    limits = EngineLimits(
        max_running=max(rows, 1),
        max_batched_tokens=max(512, rows * prompt_tokens + rows),
        prepack_weights=prepack,
        torch_threads=0,  # measured, as the inference service does
    )
    harness = Harness(loaded, limits)
    harness.submit(rows, prompt_tokens, max_tokens=4 * steps + 64)
    while harness.step() == 0:  # prefill
        pass
    for _ in range(5):
        harness.step()
    timings: dict[str, list[float]] = defaultdict(list)
    for _ in range(steps):
        harness.step(timings)
    undo = _model_ranges(loaded.model, harness.runner)
    try:
        with profiled() as prof:
            for _ in range(steps):
                harness.step()
    finally:
        undo()
    parts = {part: total / steps / 1e3 for part, total in _by_part(prof).items()}  # ms per step
    phases = {phase: statistics.median(values) * 1e3 for phase, values in timings.items()}
    choice = harness.runner.threads
    return phases, parts, f"{choice.threads} ({choice.reason})" if choice else "as torch had them"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bench")
    parser.add_argument("--rows", default="16,32", help="comma-separated decode batch sizes")
    parser.add_argument("--steps", type=int, default=20, help="decode steps measured per batch size")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length of every sequence")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (as the service chooses)")
    parser.add_argument("--no-prepack", dest="prepack", action="store_false", help="plain torch linear layers")
    args = parser.parse_args()
    levels = [int(r) for r in args.rows.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_default_model(Path(tmp) / f"sluice-{args.preset}", shape=PRESETS[args.preset])
        loaded = load_model(model_dir, args.device, dtype=args.dtype)
        # Each level on a model of its own: the runner prepacks the model it is given.
        results = {
            rows: profile_rows(
                load_model(model_dir, args.device, dtype=args.dtype), rows, args.steps, args.prompt_tokens, args.prepack
            )
            for rows in levels
        }
    packed = "prepacked linear weights" if args.prepack else "plain linear layers"
    print(f"\n{args.preset} preset, {loaded.model.dtype}, {packed}, torch threads {results[levels[0]][2]}")
    print(f"decode step, {args.prompt_tokens}-token prompts, median of {args.steps} steps (ms):\n")
    header = "| phase | " + " | ".join(f"{rows} rows" for rows in levels) + " |"
    print(header)
    print("| --- " * (len(levels) + 1) + "|")
    for phase in PHASES:
        print(f"| {phase} | " + " | ".join(f"{results[r][0][phase]:.2f}" for r in levels) + " |")
    total = {r: sum(results[r][0].values()) for r in levels}
    print("| step | " + " | ".join(f"{total[r]:.2f}" for r in levels) + " |")
    per_row = " | ".join(f"{total[r] / r:.2f}" for r in levels)
    print(f"| per row | {per_row} |")
    print("\ninside the model runner, own CPU time of the ops by part (ms per step, under the profiler):\n")
    parts = sorted({p for r in levels for p in results[r][1]}, key=lambda p: -results[levels[-1]][1].get(p, 0))
    print(header.replace("phase", "part"))
    print("| --- " * (len(levels) + 1) + "|")
    for part in parts:
        print(f"| {part} | " + " | ".join(f"{results[r][1].get(part, 0):.2f}" for r in levels) + " |")
    python = {r: results[r][0]["model runner"] - sum(results[r][1].values()) for r in levels}
    print("| Python and unprofiled (runner time minus ops) | " + " | ".join(f"{python[r]:.2f}" for r in levels) + " |")


if __name__ == "__main__":
    main()
