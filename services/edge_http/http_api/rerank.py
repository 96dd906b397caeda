"""/v1/rerank: documents ordered by relevance to a query (the request → Embed inputs; the reply →
ranked results).

Sluice serves no cross-encoder, so the scores come from the embedding model: the
cosine of the query's and each document's unit vectors, mapped to [0, 1] as (1 + cos) / 2
(same order, a range Dify's score threshold expects). Query and documents go out in one Embed
call, so they share forward passes.
"""

from __future__ import annotations

from services.edge_http.openai_schema import (
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
)
from services.mesh.stubs import inference_pb2


def rerank_inputs(body: RerankRequest) -> list[inference_pb2.EmbedInput]:
    return [inference_pb2.EmbedInput(text=text) for text in (body.query, *body.texts)]


def ranked(body: RerankRequest, model: str, reply: inference_pb2.EmbedReply) -> RerankResponse:
    query, *documents = (list(e.values) for e in reply.embeddings)
    scores = [(1.0 + sum(q * d for q, d in zip(query, doc, strict=True))) / 2.0 for doc in documents]
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)[: body.top_n]
    texts = body.texts
    return RerankResponse(
        model=model,
        results=[
            RerankResult(
                index=i,
                relevance_score=scores[i],
                document=RerankDocument(text=texts[i]) if body.return_documents else None,
            )
            for i in order
        ],
        usage=RerankUsage(total_tokens=reply.prompt_tokens),
    )
