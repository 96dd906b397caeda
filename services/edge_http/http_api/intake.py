"""What the edge accepts as a request before any route sees it: the size of its headers and
body, and JSON that is valid Unicode and not nested absurdly deep.

A refused request is answered so the client can read the answer: an oversized body is read
and discarded (up to DISCARD_LIMIT_BYTES) before the 413 goes out and the connection closes.
Closing a socket with unread bytes makes the kernel send a reset, and a client still writing
its body then sees "connection reset" instead of the 413.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.edge_http.http_api.errors import OpenAIError
from services.mesh.contracts.json_limits import depth_problem, text_problem

# Request headers beyond this are refused with 431 (Envoy's default limit is 60 KiB).
MAX_HEADER_BYTES = 64 * 1024
# What the HTTP parser buffers of a request head at most, so that a head between the two
# limits is read whole and refused readably instead of by a reset.
HEADER_READ_LIMIT_BYTES = 4 * 1024 * 1024
# An oversized body is read and discarded up to this much, so its 413 can be read; beyond it
# the connection is closed early (a client that sends this much past the limit is not waiting).
DISCARD_LIMIT_BYTES = 64 * 1024 * 1024


class Rejected(HTTPException):
    """A request refused while its body is read (FastAPI lets HTTPExceptions from the body
    through); answered as its OpenAI error by the app's HTTPException handler."""

    def __init__(self, error: OpenAIError) -> None:
        super().__init__(error.status, error.message, error.headers)
        self.error = error


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(
        413, f"the request body exceeds {max_bytes} bytes", code="request_too_large", headers={"Connection": "close"}
    )


async def _discard(receive: Receive, budget: int) -> None:
    """Read what is left of the body (up to `budget` bytes) and drop it."""
    more = True
    while more and budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return  # the client went away
        budget -= len(message.get("body", b""))
        more = message.get("more_body", False)


class LimitRequest:
    """431 for headers over MAX_HEADER_BYTES; 413 for a body over `max_bytes`, whether it says so
    in Content-Length or turns out so while chunks arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if sum(len(name) + len(value) for name, value in headers) > MAX_HEADER_BYTES:
            error = OpenAIError(
                431,
                f"the request headers exceed {MAX_HEADER_BYTES} bytes",
                code="request_header_fields_too_large",
                headers={"Connection": "close"},
            )
            await self._refuse(error, scope, receive, send)
            return
        declared = next((v for k, v in headers if k == b"content-length"), b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(_too_large(self.max_bytes), scope, receive, send, int(declared))
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                if message.get("more_body", False):
                    await _discard(receive, DISCARD_LIMIT_BYTES - seen)
                raise Rejected(_too_large(self.max_bytes))
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, error: OpenAIError, scope: Scope, receive: Receive, send: Send, size: int = 0) -> None:
        waits = any(k == b"expect" and v.lower() == b"100-continue" for k, v in scope["headers"])
        # A client waiting for 100 Continue has sent no body; one larger than the discard limit
        # is not worth reading: both get the answer at once.
        if not waits and size <= DISCARD_LIMIT_BYTES:
            await _discard(receive, DISCARD_LIMIT_BYTES)
        await error.response()(scope, receive, send)


class CheckedJSONRequest(Request):
    """A request whose JSON body is parsed once and checked: no nesting beyond MAX_DEPTH
    (measured before parsing: Python's parser recurses) and valid Unicode text (no unpaired
    surrogates, which protobuf cannot carry), each a 400 naming the field."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                text = body.decode(json.detect_encoding(body), "surrogatepass")  # as json.loads reads bytes
            except UnicodeDecodeError as err:
                error = OpenAIError(400, f"the request body is not UTF-8: {err.reason}", code="invalid_json")
                raise Rejected(error) from None
            document, problem = None, depth_problem(text)
            if problem is None:
                document = json.loads(text)  # a JSONDecodeError is FastAPI's own 400
                problem = text_problem(document)
            if problem is not None:
                where = problem.path or "the request body"
                error = OpenAIError(400, f"{where}: {problem.reason}", param=problem.path or None, code="invalid_value")
                raise Rejected(error)
            self._json = document
        return self._json


class CheckedRoute(APIRoute):
    """FastAPI's route, handing its handler a CheckedJSONRequest (FastAPI's documented way to
    customise how a body is read)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            return await handler(CheckedJSONRequest(request.scope, request.receive))

        return checked
