"""Log lines for people on a terminal, JSON for everything else: chosen by TTY and by flag."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
from collections.abc import Iterator

import pytest

from services.mesh.logs import configure_logging, log_format, request_scope


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.fixture
def terminal() -> Iterator[io.TextIOWrapper]:
    """The writing end of a real pseudo-terminal (isatty is true), and its output drained."""
    leader, follower = pty.openpty()
    stream = io.TextIOWrapper(os.fdopen(follower, "wb", buffering=0), write_through=True)
    try:
        yield stream
    finally:
        stream.close()
        os.close(leader)


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_auto_is_text_on_a_terminal_and_json_elsewhere(terminal: io.TextIOWrapper) -> None:
    assert terminal.isatty()
    assert log_format("auto", terminal) == "text"
    assert log_format("auto", io.StringIO()) == "json"
    assert log_format("json", terminal) == "json"  # the flag wins over the terminal
    assert log_format("text", io.StringIO()) == "text"
    with pytest.raises(ValueError, match="auto, json, text"):
        log_format("yaml", terminal)


def test_json_lines_carry_the_request_id() -> None:
    out = io.StringIO()
    configure_logging("info", "edge", "auto", out)
    with request_scope("req-7"):
        logging.getLogger("services.test").info("hello %s", "there")
    (line,) = _lines(out)
    record = json.loads(line)
    assert record["message"] == "hello there" and record["service"] == "edge" and record["level"] == "INFO"
    assert record["request_id"] == "req-7" and "time" in record


def test_text_lines_are_short_and_coloured_only_where_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    configure_logging("info", "inference", "text", out)
    logging.getLogger("services.test").warning("engine stalled")
    (line,) = _lines(out)
    stamp, service, level, message = line.split(maxsplit=3)
    assert (service, level, message) == ("inference", "WARNING", "engine stalled")
    assert len(stamp) == 8 and stamp.count(":") == 2  # HH:MM:SS
    assert "\033[" not in line  # not a terminal: no colour codes


def test_a_terminal_gets_colour_unless_no_color(terminal: io.TextIOWrapper, monkeypatch: pytest.MonkeyPatch) -> None:
    records: list[str] = []
    monkeypatch.delenv("NO_COLOR", raising=False)
    configure_logging("info", "edge", "auto", terminal)
    handler = logging.getLogger().handlers[0]
    record = logging.LogRecord("services.test", logging.ERROR, __file__, 1, "refused", None, None)
    record.service, record.request_id = "edge", None
    records.append(handler.format(record))
    monkeypatch.setenv("NO_COLOR", "1")
    configure_logging("info", "edge", "auto", terminal)
    records.append(logging.getLogger().handlers[0].format(record))
    assert "\033[31mERROR" in records[0]
    assert "\033[" not in records[1] and "ERROR refused" in records[1]
