"""/v1/embeddings: the OpenAI request → the inputs of one Embed call; its reply → the OpenAI list of embeddings."""

from __future__ import annotations

import base64
import struct

from services.edge_http.core.failures import EdgeError, Failure
from services.edge_http.openai_schema import EmbeddingData, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from services.mesh.stubs import inference_pb2


def embed_inputs(body: EmbeddingRequest) -> list[inference_pb2.EmbedInput]:
    items = body.input if isinstance(body.input, list) else [body.input]
    if items and isinstance(items[0], int):
        items = [items]  # one input given as token ids
    return [
        inference_pb2.EmbedInput(text=item) if isinstance(item, str) else inference_pb2.EmbedInput(token_ids=item)
        for item in items
    ]


def _encode(values: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return list(values)
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def embedding_list(body: EmbeddingRequest, model: str, reply: inference_pb2.EmbedReply) -> EmbeddingList:
    dimensions = len(reply.embeddings[0].values) if reply.embeddings else 0
    if body.dimensions is not None and body.dimensions != dimensions:
        raise EdgeError(
            Failure.INVALID,
            f"dimensions: {model} returns {dimensions}-dimensional embeddings and cannot shorten them",
            param="dimensions",
            code="unsupported_value",
        )
    return EmbeddingList(
        data=[
            EmbeddingData(index=i, embedding=_encode(e.values, body.encoding_format))
            for i, e in enumerate(reply.embeddings)
        ],
        model=model,
        usage=EmbeddingUsage(prompt_tokens=reply.prompt_tokens, total_tokens=reply.prompt_tokens),
    )
