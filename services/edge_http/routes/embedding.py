"""/v1/embeddings and /v1/rerank: one Embed call on an instance of an embedding model, charged to
the caller's tokens."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.edge_http.dependencies import ERROR_RESPONSES, Caller
from services.edge_http.embeddings import embed_inputs, embedding_list
from services.edge_http.guard import Guard, audited
from services.edge_http.intake import CheckedRoute
from services.edge_http.keys import KeyRecord
from services.edge_http.models import Served
from services.edge_http.observe import request_id
from services.edge_http.openai_schema import EmbeddingRequest, RerankRequest
from services.edge_http.pipeline import Pipeline
from services.edge_http.rerank import ranked, rerank_inputs
from services.edge_http.routing import route, version_header
from services.mesh.stubs import inference_pb2

router = APIRouter(route_class=CheckedRoute, responses=ERROR_RESPONSES)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, key: Caller) -> JSONResponse:
    """OpenAI embeddings from an instance serving an embedding model; batched with other callers."""
    target, reply = await _embed(request, key, body.model, embed_inputs(body), body.truncate_prompt_tokens)
    result = embedding_list(body, target.id, reply)
    return JSONResponse(result.model_dump(mode="json"), headers=version_header(target))


@router.post("/v1/rerank")
async def rerank(body: RerankRequest, request: Request, key: Caller) -> JSONResponse:
    """Documents ordered by relevance to the query (Jina/Cohere shape), scored by an embedding model."""
    target, reply = await _embed(request, key, body.model, rerank_inputs(body))
    return JSONResponse(ranked(body, target.id, reply).model_dump(mode="json"), headers=version_header(target))


async def _embed(
    request: Request,
    key: KeyRecord | None,
    model: str,
    inputs: list[inference_pb2.EmbedInput],
    truncate: int | None = None,
) -> tuple[Served, inference_pb2.EmbedReply]:
    pipeline: Pipeline = request.app.state.pipeline
    guard: Guard = request.app.state.guard
    target = await route(request, key, model, "embedding")
    account = audited(request, await guard.reserve(key, 1))
    reply = await pipeline.embed(target, inputs, request_id(request.scope), truncate)
    await account(reply.prompt_tokens)
    return target, reply
