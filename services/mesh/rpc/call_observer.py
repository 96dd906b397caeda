"""Per-call bookkeeping on every gRPC server: Prometheus count and latency by method and
status code, and the caller's `x-request-id` in the logging context while the call runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc
import grpc.aio
from prometheus_client import Counter, Histogram

from services.mesh.logs import request_scope
from services.mesh.rpc.handlers import Behavior, UnaryRequestInterceptor, wrap_behavior

REQUEST_ID_METADATA = "x-request-id"
Track = Callable[[grpc.aio.ServicerContext], None]
# Health checks, and watches (grpc.health.v1's Watch, Inference.WatchLoad), which live as long as
# the caller's channel: they are not work a drain waits for.
_UNTRACKED_PREFIX = "/grpc.health.v1.Health/"


def _untracked(method: str) -> bool:
    return method.startswith(_UNTRACKED_PREFIX) or method.rsplit("/", 1)[-1].startswith("Watch")


HANDLED = Counter(
    "sluice_grpc_server_handled_total", "gRPC calls completed, by method and status code", ["method", "code"]
)
HANDLING = Histogram(
    "sluice_grpc_server_handling_seconds",
    "Time from the start of a gRPC call to its end (whole stream for streaming calls)",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


def _record(method: str, context: grpc.aio.ServicerContext, outcome: str, started: float) -> None:
    code = context.code()  # set when the handler aborted with a status
    HANDLED.labels(method, code.name if code is not None else outcome).inc()
    HANDLING.labels(method).observe(time.perf_counter() - started)


class CallObserver(UnaryRequestInterceptor):
    """Also counts the calls running now, for a drain to wait on. Calls, their done callbacks and
    the drain all run on the server's event loop, so the count needs no lock."""

    def __init__(self) -> None:
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        """Calls running now, health checks and watches excluded."""
        return self._active

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is running (True) or `timeout_s` passed (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout_s))
        except TimeoutError:
            return False
        return True

    def _track(self, delta: int) -> None:
        self._active += delta
        if self._active:
            self._idle.clear()
        else:
            self._idle.set()

    def _started(self, context: grpc.aio.ServicerContext) -> None:
        """Count a call from its start until grpc has sent its last message and status: a drain
        that stopped the server once the handler returned could still cut what it answered."""
        if context.done():
            return  # the call had already terminated
        self._track(1)
        context.add_done_callback(lambda _: self._track(-1))

    def intercept(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        request_id = dict(details.invocation_metadata or ()).get(REQUEST_ID_METADATA)
        track = self._started if not _untracked(method) else lambda _: None
        return wrap_behavior(
            handler,
            lambda behavior: self._unary(behavior, method, request_id, track),
            lambda behavior: self._streaming(behavior, method, request_id, track),
        )

    @staticmethod
    def _unary(behavior: Behavior, method: str, request_id: str | None, track: Track) -> Behavior:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, outcome = time.perf_counter(), "UNKNOWN"
            track(context)
            try:
                with request_scope(request_id):
                    reply = await behavior(request, context)
                outcome = "OK"
                return reply
            except asyncio.CancelledError:
                outcome = "CANCELLED"  # the client went away
                raise
            finally:
                _record(method, context, outcome, started)

        return observed

    @staticmethod
    def _streaming(behavior: Behavior, method: str, request_id: str | None, track: Track) -> Behavior:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started, outcome = time.perf_counter(), "UNKNOWN"
            track(context)
            try:
                async with aclosing(behavior(request, context)) as responses:
                    while True:
                        # The request id is set around each step, never across a yield.
                        with request_scope(request_id):
                            try:
                                response = await anext(responses)
                            except StopAsyncIteration:
                                break
                        yield response
                outcome = "OK"
            except (asyncio.CancelledError, GeneratorExit):
                outcome = "CANCELLED"  # the client went away and gRPC closed the stream
                raise
            finally:
                _record(method, context, outcome, started)

        return observed
