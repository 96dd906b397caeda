"""/v1/embeddings and /v1/rerank: embeddings from the core, in OpenAI's and Jina/Cohere's shapes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.edge_http.http_api.answers import version_header
from services.edge_http.http_api.dependencies import ERROR_RESPONSES, CallerKey, Context, core
from services.edge_http.http_api.embeddings import embed_inputs, embedding_list
from services.edge_http.http_api.intake import CheckedRoute
from services.edge_http.http_api.rerank import ranked, rerank_inputs
from services.edge_http.openai_schema import EmbeddingRequest, RerankRequest

router = APIRouter(route_class=CheckedRoute, responses=ERROR_RESPONSES)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, caller: CallerKey, context: Context) -> JSONResponse:
    """OpenAI embeddings from an instance serving an embedding model; batched with other callers."""
    inputs = embed_inputs(body)
    target, reply = await core(request).embeddings.embed(
        caller, body.model, inputs, context, body.truncate_prompt_tokens
    )
    result = embedding_list(body, target.id, reply)
    return JSONResponse(result.model_dump(mode="json"), headers=version_header(target))


@router.post("/v1/rerank")
async def rerank(body: RerankRequest, request: Request, caller: CallerKey, context: Context) -> JSONResponse:
    """Documents ordered by relevance to the query (Jina/Cohere shape), scored by an embedding model."""
    target, reply = await core(request).embeddings.embed(caller, body.model, rerank_inputs(body), context)
    return JSONResponse(ranked(body, target.id, reply).model_dump(mode="json"), headers=version_header(target))
