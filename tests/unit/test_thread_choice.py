"""The torch thread count chosen at start from measured forward passes (fake timings here)."""

from __future__ import annotations

from collections.abc import Callable

from services.inference.threads import MARGIN, choose_threads, timed_forward


def _timer(seconds: dict[int, float], calls: list[int]) -> Callable[[int], float]:
    def forward_s(threads: int) -> float:
        calls.append(threads)
        return seconds[threads]

    return forward_s


def test_a_small_model_gets_one_thread_when_more_do_not_pay() -> None:
    calls: list[int] = []
    choice = choose_threads(2, _timer({1: 0.010, 2: 0.010 / (MARGIN - 0.05)}, calls))
    assert choice.threads == 1
    assert "1 thread" in choice.reason and "2" in choice.reason
    assert calls[:2] == [2, 1] and calls[2:] == [1, 2] * 3  # a warm-up of each, then alternated


def test_all_threads_when_they_are_clearly_faster() -> None:
    calls: list[int] = []
    choice = choose_threads(8, _timer({1: 0.040, 8: 0.040 / (MARGIN + 0.05)}, calls))
    assert choice.threads == 8
    assert calls[2:] == [1, 8] * 3


def test_medians_decide_not_one_lucky_run() -> None:
    runs = iter([0.010, 0.010, 0.020, 0.010, 0.020, 0.010, 0.001, 0.010])  # warm-ups, then 1, 2, 1, 2, 1, 2
    choice = choose_threads(2, lambda _: next(runs))
    assert choice.threads == 2  # one thread's median is 20 ms against 10 ms, despite one 1 ms run


def test_a_slow_model_is_measured_too() -> None:
    """However slow its pass, a model keeps more threads only when they are clearly faster: on a
    shared machine one thread served even large models' steps faster."""
    calls: list[int] = []
    choice = choose_threads(4, _timer({1: 0.20, 4: 0.25}, calls))
    assert choice.threads == 1 and calls[2:] == [1, 4] * 3


def test_the_pass_is_timed_on_a_thread_of_its_own() -> None:
    """As the engine runs its passes: not on the caller's thread (its OpenMP team is another)."""
    import threading

    import torch

    seen: list[int] = []

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(8, 4)

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.embed

        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

        def forward(self, **_: object) -> None:
            seen.append(threading.get_ident())

    before = torch.get_num_threads()
    try:
        with timed_forward(Model()) as forward_s:
            assert forward_s(1) >= 0 and forward_s(1) >= 0
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 2 and seen[0] == seen[1] != threading.get_ident()
