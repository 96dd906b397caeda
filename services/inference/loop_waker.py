"""Waking an event loop's readers from the engine thread, once per burst of deliveries."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import ClassVar


class LoopWaker:
    """Wakes the step readers of one event loop. The engine thread hands a step to every running
    sequence in turn; inside `deliveries()` their wake-ups wait for the end, so one wake-up of
    the loop (a write to its self-pipe, then a turn with the GIL) serves them all instead of
    one each, and the loop does not take the GIL back between two deliveries."""

    _of: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker]] = weakref.WeakKeyDictionary()
    _held = threading.local()  # per thread: the wakers whose wake-up waits for the end of a delivery

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # the registry's value must not keep its key alive
        self._lock = threading.Lock()
        self._due: list[asyncio.Event] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopWaker:
        """The loop's waker (called on the loop's own thread)."""
        waker = cls._of.get(loop)
        if waker is None:
            waker = cls._of[loop] = cls(loop)
        return waker

    @classmethod
    @contextlib.contextmanager
    def deliveries(cls) -> Iterator[None]:
        """Wake-ups asked for on this thread within are sent at the end, once per loop."""
        held: set[LoopWaker] = set()
        outer = getattr(cls._held, "wakers", None)
        cls._held.wakers = held
        try:
            yield
        finally:
            cls._held.wakers = outer
            for waker in held:
                waker._schedule()

    def wake(self, ready: asyncio.Event) -> None:
        """Set `ready` on the loop soon (from any thread)."""
        with self._lock:
            first = not self._due
            self._due.append(ready)
        if not first:
            return  # a wake-up is already on its way or held
        held: set[LoopWaker] | None = getattr(self._held, "wakers", None)
        if held is not None:
            held.add(self)
        else:
            self._schedule()

    def _schedule(self) -> None:
        loop = self._loop()
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop has closed: nobody waits
            with self._lock:
                self._due.clear()

    def _flush(self) -> None:
        with self._lock:
            due, self._due = self._due, []
        for ready in due:
            ready.set()
