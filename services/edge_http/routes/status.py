"""What the edge serves and how it is doing: /v1/models, /health and /metrics."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.edge_http.dependencies import ERROR_RESPONSES, Caller
from services.edge_http.models import ModelRouter
from services.edge_http.openai_schema import Model, ModelList
from services.edge_http.readiness import readiness
from services.edge_http.upstreams import Upstreams
from services.mesh.discovery import UPSTREAM_SERVICES

router = APIRouter()


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def list_models(request: Request, key: Caller) -> ModelList:
    """Every model id (and alias of one) with at least one healthy instance."""
    upstreams: Upstreams = request.app.state.upstreams
    aliases: ModelRouter = request.app.state.router
    await upstreams.describe_all()
    serving = {s.id: s for s in upstreams.served() if s.healthy}
    names = {model_id: model_id for model_id in serving}
    names |= {alias: target for alias, target in aliases.aliases.items() if target in serving}
    visible = [
        (name, serving[target])
        for name, target in sorted(names.items())
        if key is None or key.allows(name) or key.allows(target)
    ]
    return ModelList(data=[Model(id=name, created=s.created, owned_by="sluice") for name, s in visible])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Ready to serve: per service and per model, how many instances are SERVING; 503 when some
    model or a required service has none, `degraded` (200) when only some replicas are down."""
    upstreams: Upstreams = request.app.state.upstreams
    verdict = readiness(UPSTREAM_SERVICES, await upstreams.health())
    body = {
        "status": verdict.status,
        "services": {name: asdict(a) for name, a in verdict.services.items()},
        "models": {name: asdict(a) for name, a in verdict.models.items()},
    }
    return JSONResponse(body, status_code=verdict.http_status)


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
