"""Process-wide logging shared by every service and the CLI.

For people at a terminal, short lines: time, service, level (in colour unless NO_COLOR is set)
and message. For files, pipes and containers, JSON lines (one object per line: time, level,
service, logger, message, and the request id and trace id of the request being served when there
is one). `auto`, the default, picks text when the log goes to a terminal and JSON otherwise. The
request id travels in a context variable: the edge sets it per HTTP request, gRPC servers per call
from the `x-request-id` metadata.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

LOG_FORMATS = ("auto", "json", "text")
_COLOURS = {"DEBUG": "\033[2m", "WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[1;31m"}
_RESET = "\033[0m"

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


class _ConsoleFormatter(logging.Formatter):
    """`14:03:07 inference  INFO  message [request id]`: what a person scanning a terminal needs."""

    def __init__(self, colour: bool) -> None:
        super().__init__()
        self._colour = colour

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = f"{record.levelname:<5}"
        if self._colour and record.levelname in _COLOURS:
            level = f"{_COLOURS[record.levelname]}{level}{_RESET}"
        request = getattr(record, "request_id", None)
        line = f"{stamp} {getattr(record, 'service', '-'):<10} {level} {record.getMessage()}"
        line += f" [{request}]" if request else ""
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def log_format(fmt: str, stream: TextIO) -> str:
    """The format `fmt` means for this stream: `auto` is text on a terminal, JSON elsewhere."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    if fmt != "auto":
        return fmt
    return "text" if stream.isatty() else "json"


def configure_logging(level: str, service: str, fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.addFilter(_RequestContext(service))
    fmt = log_format(fmt, stream)
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
        handler.setFormatter(_ConsoleFormatter(colour=stream.isatty() and "NO_COLOR" not in os.environ))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # library warnings become log lines too
