"""Trace spans for a generation's phases, drawn after the fact from the engine's timestamps,
so the engine loop itself never touches tracing."""

from __future__ import annotations

import time

from opentelemetry import trace

from services.inference.engine_api import Generation
from services.mesh.telemetry import epoch_ns

_tracer = trace.get_tracer(__name__)


def record_phases(handle: Generation, tokens: int, finish_reason: str | None) -> None:
    """Queue wait, prefill and decode as children of the current (Generate) span."""
    if not trace.get_current_span().is_recording():
        return
    ended = handle.finished_at or time.monotonic()
    request = handle.request
    phases = (
        ("inference.queue", handle.queued_at, handle.admitted_at or ended, {}),
        (
            "inference.prefill",
            handle.admitted_at,
            handle.first_token_at or ended,
            {"gen_ai.usage.input_tokens": len(request.prompt_ids)},
        ),
        (
            "inference.decode",
            handle.first_token_at,
            ended,
            {"gen_ai.usage.output_tokens": tokens, "gen_ai.response.finish_reasons": [finish_reason or "cancelled"]},
        ),
    )
    for name, start, end, attributes in phases:
        if start is None:
            continue  # never reached this phase (dropped from the queue, cancelled in prefill)
        span = _tracer.start_span(name, start_time=epoch_ns(start), attributes=attributes)
        span.set_attribute("sluice.request_id", request.request_id)
        span.end(end_time=epoch_ns(end))
