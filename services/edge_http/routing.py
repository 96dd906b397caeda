"""Which instance's model serves a request: the name resolved (aliases, weights, the version pin
header), checked against the caller's key and the endpoint's kind."""

from __future__ import annotations

from fastapi import Request
from opentelemetry import trace

from services.edge_http.errors import RETRY_AFTER_S, OpenAIError
from services.edge_http.guard import Guard
from services.edge_http.keys import KeyRecord
from services.edge_http.models import VERSION_HEADER, ModelRouter, Served, UnknownModel, UnknownVersion
from services.edge_http.observe import record
from services.edge_http.upstreams import Upstreams


async def route(request: Request, key: KeyRecord | None, name: str, kind: str) -> Served:
    """The model version that serves this request, checked against the key and the endpoint's
    kind; labels the request's metrics and trace with it."""
    router: ModelRouter = request.app.state.router
    upstreams: Upstreams = request.app.state.upstreams
    guard: Guard = request.app.state.guard
    model_id = router.resolve(name)
    guard.allow_model(key, name, model_id)
    pinned = request.headers.get(VERSION_HEADER)
    try:
        if not any(s.id == model_id for s in upstreams.served()):
            await upstreams.describe_all()
        target = router.choose(model_id, upstreams.served(), pinned)
    except UnknownModel:
        if any(e.info is None for e in upstreams.pools["inference"].endpoints):
            starting = "inference instances are still starting"
            retry = {"Retry-After": str(RETRY_AFTER_S)}
            raise OpenAIError(503, starting, "service_unavailable", code="unavailable", headers=retry) from None
        missing = f"the model `{name}` does not exist"
        raise OpenAIError(404, missing, param="model", code="model_not_found") from None
    except UnknownVersion as err:
        raise OpenAIError(404, str(err), param=VERSION_HEADER, code="model_version_not_found") from None
    if target.kind != kind:
        use = "/v1/embeddings" if target.kind == "embedding" else "/v1/chat/completions"
        raise OpenAIError(400, f"`{name}` is a {target.kind} model: use {use}", param="model", code="wrong_model_kind")
    record(request.scope).model = target.id
    trace.get_current_span().set_attributes(
        {"gen_ai.response.model": target.id, "sluice.model.version": target.version}
    )
    return target


def version_header(target: Served) -> dict[str, str]:
    """The response header that says which version of the model answered (versioned models only)."""
    return {VERSION_HEADER: target.version} if target.version else {}
