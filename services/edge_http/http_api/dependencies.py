"""What every OpenAI endpoint takes: the edge's core, the caller (authenticated by the core from
the bearer credential), the request's context, and the error responses it documents."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.edge_http.core.admission import Caller
from services.edge_http.core.context import VERSION_HEADER, RequestContext
from services.edge_http.core.edge import EdgeCore
from services.edge_http.http_api.observe import record
from services.edge_http.openai_schema import ErrorBody

ERROR_RESPONSES: dict[int | str, dict] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 413, 429, 500, 503, 504)
}
bearer = HTTPBearer(auto_error=False, description="an API key from `sluice keys create`")


def core(request: Request) -> EdgeCore:
    return request.app.state.core  # type: ignore[no-any-return]


def request_context(request: Request) -> RequestContext:
    """The request's id and audit record, and what its headers ask of the mesh."""
    directives = request.headers.get("cache-control", "").lower()
    return RequestContext(
        record(request.scope),
        no_cache="no-cache" in directives or "no-store" in directives,
        pinned_version=request.headers.get(VERSION_HEADER),
    )


async def _caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> Caller:
    credential = credentials.credentials if credentials is not None else None
    return await core(request).guard.authenticate(credential, record(request.scope))


# The caller's API key record (None when the edge runs --no-auth).
CallerKey = Annotated[Caller, Depends(_caller)]
# The request's context (id, audit record, cache and version directives).
Context = Annotated[RequestContext, Depends(request_context)]
