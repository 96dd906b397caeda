"""Process-wide logging shared by every service and the CLI.

JSON lines by default (one object per line: time, level, service, logger, message, and the
request id and trace id of the request being served when there is one), or plain text for
people reading a terminal. The request id travels in a context variable: the edge sets it per
HTTP request, gRPC servers per call from the `x-request-id` metadata.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

LOG_FORMATS = ("json", "text")

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("sluice_request_id", default=None)


@contextmanager
def request_scope(request_id: str | None) -> Iterator[None]:
    """Tag every log line written inside the block with this request id."""
    token = _request_id.set(request_id or None)
    try:
        yield
    finally:
        _request_id.reset(token)


class _RequestContext(logging.Filter):
    """Adds request_id, trace_id and span_id (None outside a request or a recorded span)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self._service
        record.request_id = _request_id.get()
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else None
        record.span_id = format(context.span_id, "016x") if context.is_valid else None
        return True


def configure_logging(level: str, service: str, fmt: str = "json") -> None:
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestContext(service))
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "{levelname}{service}{name}{message}{request_id}{trace_id}{span_id}",
                style="{",
                rename_fields={"levelname": "level", "name": "logger"},
                timestamp="time",  # ISO 8601 in UTC
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(service)s %(name)s [%(request_id)s]: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # library warnings become log lines too
