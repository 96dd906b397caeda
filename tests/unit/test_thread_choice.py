"""The torch thread count chosen at start from measured forward passes (fake timings here)."""

from __future__ import annotations

from collections.abc import Callable

from services.inference.threads import LARGE_S, MARGIN, choose_threads


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
    assert calls[:2] == [2, 2] and calls[2:] == [1, 2] * 3  # a warm-up and a look, then alternated


def test_all_threads_when_they_are_clearly_faster() -> None:
    calls: list[int] = []
    choice = choose_threads(8, _timer({1: 0.040, 8: 0.040 / (MARGIN + 0.05)}, calls))
    assert choice.threads == 8
    assert calls[2:] == [1, 8] * 3


def test_medians_decide_not_one_lucky_run() -> None:
    runs = iter([0.010, 0.010, 0.020, 0.010, 0.020, 0.010, 0.001, 0.010])  # warm-up, look, then 1, 2, 1, 2, 1, 2
    choice = choose_threads(2, lambda _: next(runs))
    assert choice.threads == 2  # one thread's median is 20 ms against 10 ms, despite one 1 ms run


def test_a_slow_forward_pass_keeps_every_thread_without_measuring() -> None:
    calls: list[int] = []
    choice = choose_threads(4, _timer({4: LARGE_S * 2}, calls))
    assert choice.threads == 4 and calls == [4, 4]


def test_a_slow_first_call_alone_does_not_make_a_model_large() -> None:
    runs = iter([LARGE_S * 5, *[0.010] * 7])  # one-off costs on the warm-up only, then 10 ms everywhere
    choice = choose_threads(2, lambda _: next(runs))
    assert choice.threads == 1 and "10.0 ms on 1 thread" in choice.reason


def test_one_core_is_one_thread() -> None:
    assert choose_threads(1, lambda _: 1 / 0).threads == 1
