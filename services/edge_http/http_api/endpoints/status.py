"""What the edge serves and how it is doing: /v1/models, /health and /metrics."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.edge_http.http_api.dependencies import ERROR_RESPONSES, CallerKey, core
from services.edge_http.openai_schema import Model, ModelList

router = APIRouter()


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def list_models(request: Request, caller: CallerKey) -> ModelList:
    """Every model id (and alias of one) with at least one healthy instance."""
    visible = await core(request).catalog.visible(caller)
    return ModelList(data=[Model(id=name, created=s.created, owned_by="sluice") for name, s in visible])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Ready to serve: per service and per model, how many instances are SERVING; 503 when some
    model or a required service has none, `degraded` (200) when only some replicas are down."""
    verdict = await core(request).readiness()
    body = {
        "status": verdict.status,
        "services": {name: asdict(a) for name, a in verdict.services.items()},
        "models": {name: asdict(a) for name, a in verdict.models.items()},
    }
    return JSONResponse(body, status_code=verdict.http_status)


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
