"""Per-call bookkeeping on every gRPC server: Prometheus count and latency by method and
status code, and the caller's `x-request-id` in the logging context while the call runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from services.mesh.handlers import UnaryRequestInterceptor, wrap_behavior
from services.mesh.logs import request_scope

REQUEST_ID_METADATA = "x-request-id"
Track = Callable[[grpc.ServicerContext], None]
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


def _record(method: str, context: grpc.ServicerContext, outcome: str, started: float) -> None:
    code = context.code()  # set when the handler aborted with a status
    HANDLED.labels(method, code.name if code is not None else outcome).inc()
    HANDLING.labels(method).observe(time.perf_counter() - started)


class CallObserver(UnaryRequestInterceptor):
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._active = 0

    @property
    def active(self) -> int:
        """Calls running now, health checks and watches excluded."""
        return self._active

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no call is running (True) or `timeout_s` passed (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._active == 0, timeout=max(0.0, timeout_s))

    def _track(self, delta: int) -> None:
        with self._changed:
            self._active += delta
            self._changed.notify_all()

    def _started(self, context: grpc.ServicerContext) -> None:
        """Count a call from its start until grpc has sent its last message and status: a drain
        that stopped the server once the handler returned could still cut what it answered."""
        self._track(1)
        if not context.add_callback(lambda: self._track(-1)):
            self._track(-1)  # the call had already terminated

    def intercept(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        request_id = dict(details.invocation_metadata or ()).get(REQUEST_ID_METADATA)
        track = self._started if not _untracked(method) else lambda _: None
        observe = self._streaming if handler.response_streaming else self._unary
        return wrap_behavior(handler, lambda behavior: observe(behavior, method, request_id, track))

    @staticmethod
    def _unary(behavior: Callable, method: str, request_id: str | None, track: Track) -> Callable:
        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            started, outcome = time.perf_counter(), "UNKNOWN"
            track(context)
            try:
                with request_scope(request_id):
                    reply = behavior(request, context)
                outcome = "OK"
                return reply
            finally:
                _record(method, context, outcome, started)

        return observed

    @staticmethod
    def _streaming(behavior: Callable, method: str, request_id: str | None, track: Track) -> Callable:
        def observed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started, outcome = time.perf_counter(), "UNKNOWN"
            track(context)
            try:
                responses = behavior(request, context)
                while True:
                    # The request id is set around each step, never across a yield.
                    with request_scope(request_id):
                        try:
                            response = next(responses)
                        except StopIteration:
                            break
                    yield response
                outcome = "OK"
            except GeneratorExit:
                outcome = "CANCELLED"  # the client went away and gRPC closed the stream
                responses.close()
                raise
            finally:
                _record(method, context, outcome, started)

        return observed
