"""ASGI middleware that gives every request an id and accounts for it: the X-Request-Id
response header, the request id in the logging context, count/latency metrics and one
audit log line per request (logger `sluice.audit`).

Pure ASGI, so streaming responses pass through unbuffered and are timed to their last byte.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.edge_http.core.context import RequestRecord
from services.edge_http.core.metrics import REQUEST_DURATION, REQUESTS
from services.mesh.logs import request_scope

audit = logging.getLogger("sluice.audit")

REQUEST_ID_HEADER = b"x-request-id"
_QUIET_ROUTES = ("/health", "/metrics")  # polled constantly; counted, not logged
# A caller's own id is kept when it is short and plain, so it can be searched for in logs.
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


_RECORD = "sluice"  # its key in the ASGI scope's state


def record(scope: Scope) -> RequestRecord:
    """The record of the request being served (made by ObserveRequests)."""
    return scope["state"][_RECORD]


def request_id(scope: Scope) -> str:
    return record(scope).request_id


class ObserveRequests:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER), b"")
        rid = sent.decode() if _CLIENT_ID.fullmatch(sent) else uuid.uuid4().hex
        noted = RequestRecord(rid)
        scope.setdefault("state", {})[_RECORD] = noted
        started = time.perf_counter()
        status = "500"  # what the client gets if the app fails before answering

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid.encode())]
            await send(message)

        with request_scope(rid):
            try:
                await self.app(scope, receive, observed_send)
            finally:
                elapsed = time.perf_counter() - started
                route = getattr(scope.get("route"), "path", "unmatched")
                labels = (route, noted.model, status)
                REQUESTS.labels(*labels).inc()
                REQUEST_DURATION.labels(*labels).observe(elapsed)
                if route not in _QUIET_ROUTES:
                    _audit(scope, status, elapsed, noted)


def _audit(scope: Scope, status: str, elapsed: float, noted: RequestRecord) -> None:
    """The audit line: who, which model, how many tokens, outcome, latency; never the prompt."""
    tokens = "-" if noted.tokens is None else noted.tokens
    fields = {
        "method": scope["method"],
        "path": scope["path"],
        "status": int(status),
        "duration_ms": round(elapsed * 1e3, 1),
        "key": noted.key_name,
        "model": noted.model,
        "tokens": noted.tokens,
    }
    audit.info(
        "%s %s %s %.1f ms key=%s model=%s tokens=%s",
        scope["method"],
        scope["path"],
        status,
        elapsed * 1e3,
        noted.key_name or "-",
        noted.model or "-",
        tokens,
        extra=fields,
    )
