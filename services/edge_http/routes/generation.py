"""/v1/chat/completions and /v1/completions: one generation flow, two shapes of answer."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from services.edge_http.chat import ChatFlow
from services.edge_http.completions import CompletionFlow
from services.edge_http.dependencies import ERROR_RESPONSES, Caller
from services.edge_http.generation import answer
from services.edge_http.intake import CheckedRoute
from services.edge_http.openai_schema import ChatCompletionRequest, CompletionRequest

router = APIRouter(route_class=CheckedRoute, responses=ERROR_RESPONSES)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, key: Caller) -> Response:
    """OpenAI chat completions; `stream: true` answers with server-sent events."""
    return await answer(request, key, body, ChatFlow(body))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, key: Caller) -> Response:
    """OpenAI (legacy) text completions; `stream: true` answers with server-sent events."""
    return await answer(request, key, body, CompletionFlow(body))
