"""/v1/chat/completions and /v1/completions: one generation in the core, two shapes of answer."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from services.edge_http.http_api import render_chat, render_completion
from services.edge_http.http_api.answers import answer
from services.edge_http.http_api.dependencies import ERROR_RESPONSES, CallerKey, Context, core
from services.edge_http.http_api.intake import CheckedRoute
from services.edge_http.openai_schema import ChatCompletionRequest, CompletionRequest

router = APIRouter(route_class=CheckedRoute, responses=ERROR_RESPONSES)


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, caller: CallerKey, context: Context
) -> Response:
    """OpenAI chat completions; `stream: true` answers with server-sent events."""
    return await answer(request, core(request), caller, body, context, render_chat.SHAPE)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, caller: CallerKey, context: Context) -> Response:
    """OpenAI (legacy) text completions; `stream: true` answers with server-sent events."""
    return await answer(request, core(request), caller, body, context, render_completion.SHAPE)
