"""SIGINT/SIGTERM as something a main loop can wait on, safely.

A handler that calls `threading.Event.set()` can deadlock: Python runs handlers in the main
thread between bytecodes, so a handler that arrives while that thread holds the event's
internal lock (inside `Event.wait`, or inside the handler of the signal before it: Ctrl-C
sends SIGINT to the whole process group and `sluice up` then sends SIGTERM as well) waits on
itself forever. These handlers take no lock: they note the signal and write one byte to a
pipe that `wait` selects on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Installed on creation (main thread only); `received` is the first stop signal seen."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received: signal.Signals | None = None
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
        with contextlib.suppress(BlockingIOError):  # the pipe already holds a wake-up byte
            os.write(self._write, b"!")

    def wait(self, timeout_s: float) -> bool:
        """True once a stop signal arrived, waiting up to `timeout_s` for one."""
        if self.received is None:
            select.select([self._read], [], [], max(0.0, timeout_s))
        return self.received is not None

    async def wait_async(self, timeout_s: float) -> bool:
        """`wait` for a caller on an event loop, which keeps running meanwhile."""
        if self.received is None:
            loop = asyncio.get_running_loop()
            woken = asyncio.Event()
            loop.add_reader(self._read, woken.set)
            try:
                await asyncio.wait_for(woken.wait(), max(0.0, timeout_s))
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(self._read)
        return self.received is not None
