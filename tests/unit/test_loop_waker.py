"""LoopWaker: readers on an event loop are woken once per burst of deliveries from another thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from loop_thread import LoopThread

from services.inference.loop_waker import LoopWaker

READERS = 16


class _Counted:
    """Counts the wake-ups a LoopWaker sends the loop (each a write to its self-pipe); the test's
    own calls onto the loop are not counted."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.calls = 0
        self._real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = self  # type: ignore[method-assign]

    def __call__(self, callback: Callable[..., Any], *args: Any) -> asyncio.Handle:
        self.calls += isinstance(getattr(callback, "__self__", None), LoopWaker)
        return self._real(callback, *args)


async def _readers(count: int) -> tuple[LoopWaker, list[asyncio.Event]]:
    return LoopWaker.of(asyncio.get_running_loop()), [asyncio.Event() for _ in range(count)]


async def _all_set(events: list[asyncio.Event]) -> None:
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in events)), timeout=10)


def test_a_delivery_wakes_each_loop_once_and_every_reader_in_it() -> None:
    with LoopThread() as thread:
        waker, events = thread.run(_readers(READERS))
        counted = _Counted(thread.loop)
        with LoopWaker.deliveries():
            for event in events:
                waker.wake(event)
            assert counted.calls == 0  # held until the delivery ends
        thread.run(_all_set(events))
        assert counted.calls == 1


def test_without_a_delivery_the_first_wake_up_goes_at_once() -> None:
    with LoopThread() as thread:
        waker, events = thread.run(_readers(1))
        counted = _Counted(thread.loop)
        waker.wake(events[0])
        assert counted.calls == 1
        thread.run(_all_set(events))


def test_each_loop_has_one_waker_shared_by_its_readers() -> None:
    with LoopThread() as first, LoopThread() as second:
        a, _ = first.run(_readers(0))
        b, _ = first.run(_readers(0))
        c, _ = second.run(_readers(0))
        assert a is b and a is not c


def test_waking_a_closed_loop_is_ignored_and_keeps_nothing() -> None:
    thread = LoopThread()
    with thread:
        waker, events = thread.run(_readers(2))
        counted = _Counted(thread.loop)
    assert thread.loop.is_closed()
    waker.wake(events[0])  # call_soon_threadsafe raises on a closed loop
    waker.wake(events[1])  # nothing kept from the first: it tries again rather than wait forever
    assert counted.calls == 2
    assert not any(event.is_set() for event in events)


def test_deliveries_on_another_thread_are_not_held() -> None:
    with LoopThread() as thread:
        waker, events = thread.run(_readers(1))
        counted = _Counted(thread.loop)
        with LoopWaker.deliveries():
            other = threading.Thread(target=waker.wake, args=(events[0],))
            other.start()
            other.join()
            assert counted.calls == 1  # the hold is the delivering thread's alone
        thread.run(_all_set(events))
