"""How many CPU threads torch gives each operation in the inference process, when the settings
leave it to us (`torch_threads` 0): measured at start, not guessed.

More threads pay only when the model's kernels are big enough to split. A decode step is
hundreds of operations; a second thread adds a hand-off to each, and on a machine the engine
shares with the edge, preprocess and the clients, every operation then also waits for whichever
of its threads the operating system put aside. So one thread is the default, and all of them are
used only when a decode-sized forward pass runs clearly faster on them in isolation (the margin
pays for the contention they meet under load). The pass is timed as the engine runs it: on a
thread of its own (whose OpenMP team is not the main thread's), on the model as the engine will
run it (prepacked weights included).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# All threads must make a forward pass at least this much faster than one thread.
MARGIN = 1.15
ROUNDS = 3  # alternations of the two contenders; medians compared
ROWS = 16  # tokens in the measured forward pass: a decode step at moderate concurrency


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str


def choose_threads(available: int, forward_s: Callable[[int], float]) -> ThreadChoice:
    """The thread count for `available` cores, given `forward_s(threads)`: the seconds one forward
    pass takes on that many threads (it sets them)."""
    if available <= 1:
        return ThreadChoice(available, "one core")
    for threads in (available, 1):  # warm-up: first calls pay one-off costs
        forward_s(threads)
    timings: dict[int, list[float]] = {1: [], available: []}
    for _ in range(ROUNDS):
        for threads in timings:
            timings[threads].append(forward_s(threads))
    one, many = (statistics.median(timings[t]) for t in (1, available))
    measured = f"{ROWS}-token forward pass: {one * 1e3:.1f} ms on 1 thread, {many * 1e3:.1f} ms on {available}"
    if one >= many * MARGIN:
        return ThreadChoice(available, measured)
    return ThreadChoice(1, f"{measured}; more threads must be {MARGIN:.2f}x faster to pay for sharing cores")


@contextmanager
def timed_forward(model: PreTrainedModel, rows: int = ROWS) -> Iterator[Callable[[int], float]]:
    """`forward_s` for choose_threads: one forward pass over `rows` tokens on the model's device,
    run on one worker thread, as the engine runs its passes on its own."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(rows, device=model.device).remainder(vocab).unsqueeze(0)

    @torch.inference_mode()
    def timed(threads: int) -> float:
        torch.set_num_threads(threads)
        started = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="threads-measure") as worker:
        yield lambda threads: worker.submit(timed, threads).result()


def apply_threads(model: PreTrainedModel, requested: int) -> ThreadChoice:
    """Set torch's threads per operation: `requested`, or when it is 0 on a CPU, the measured
    choice. Returns the choice in force, with its reason."""
    if requested:
        choice = ThreadChoice(requested, "torch_threads")
    elif model.device.type != "cpu":
        choice = ThreadChoice(torch.get_num_threads(), f"torch's default: {model.device.type} does the work")
    else:
        with timed_forward(model) as forward_s:
            choice = choose_threads(torch.get_num_threads(), forward_s)
    torch.set_num_threads(choice.threads)
    log.info("torch threads: %d (%s)", choice.threads, choice.reason, extra={"torch_threads": choice.threads})
    return choice
