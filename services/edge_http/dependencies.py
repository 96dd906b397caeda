"""What every OpenAI route takes: the caller's API key, and the error responses it documents."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials

from services.edge_http.guard import Guard, bearer
from services.edge_http.keys import KeyRecord
from services.edge_http.openai_schema import ErrorBody

ERROR_RESPONSES: dict[int | str, dict] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 413, 429, 500, 503, 504)
}


async def _caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> KeyRecord | None:
    guard: Guard = request.app.state.guard
    return await guard.authenticate(request, credentials)


# The caller's API key record (None when the edge runs --no-auth).
Caller = Annotated[KeyRecord | None, Depends(_caller)]
