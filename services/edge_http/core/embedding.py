"""Embeddings (and rerank, which scores by them) through the mesh: one Embed call on an instance
of an embedding model, charged to the caller's tokens once its size is known."""

from __future__ import annotations

from services.edge_http.core.accounting import audited
from services.edge_http.core.admission import Caller, Guard
from services.edge_http.core.catalog import Catalog
from services.edge_http.core.context import RequestContext
from services.edge_http.core.mesh_calls import MeshCalls
from services.edge_http.core.model_versions import Served
from services.mesh.config import Settings
from services.mesh.stubs import inference_pb2


class Embeddings:
    def __init__(self, settings: Settings, guard: Guard, catalog: Catalog, calls: MeshCalls) -> None:
        self._settings = settings
        self._guard = guard
        self._catalog = catalog
        self._calls = calls

    async def embed(
        self,
        caller: Caller,
        model: str,
        inputs: list[inference_pb2.EmbedInput],
        context: RequestContext,
        truncate: int | None = None,
    ) -> tuple[Served, inference_pb2.EmbedReply]:
        """The embeddings of `inputs` by the model version serving `model`; over-long inputs cut to
        `truncate` tokens (-1: the model's limit), or by the deployment's default when unsaid."""
        target = await self._catalog.target(caller, model, "embedding", context)
        settle = audited(await self._guard.reserve(caller, 1), context.record)
        if truncate is None:
            truncate = -1 if self._settings.embedding_truncate else 0
        request = inference_pb2.EmbedRequest(
            request_id=context.request_id, model=target.id, inputs=inputs, truncate_to=truncate
        )
        reply = await self._calls.embed(target, request)
        await settle(reply.prompt_tokens)
        return target, reply
