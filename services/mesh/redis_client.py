"""Redis as the mesh uses it: short timeouts (a dead Redis must not add latency) and a warning
at most every 30 s while it is unreachable, instead of one per request."""

from __future__ import annotations

import logging
import time

import redis
import redis.asyncio

TIMEOUT_S = 0.5
WARN_EVERY_S = 30.0


def sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)


def async_client(url: str) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)


class ThrottledWarning:
    """`message` (with one %s for the error), logged at most once every WARN_EVERY_S."""

    def __init__(self, logger: logging.Logger, message: str) -> None:
        self._logger, self._message = logger, message
        self._warned_at = -WARN_EVERY_S

    def emit(self, err: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            self._logger.warning(self._message, err)
