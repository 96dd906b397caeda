"""The edge's one core: what every front end (the OpenAI HTTP API; the gRPC API) hands its
requests to. It holds the clients of the mesh for the edge's lifetime and the parts that
decide: admission, the catalog of served models, generations and embeddings.

Front ends only translate: a request in their protocol becomes the core's typed request and
context, and the core's typed events and errors become their protocol's answers."""

from __future__ import annotations

from services.edge_http.core.admission import Guard
from services.edge_http.core.catalog import Catalog
from services.edge_http.core.embedding import Embeddings
from services.edge_http.core.generation import Generations
from services.edge_http.core.mesh_calls import MeshCalls
from services.edge_http.core.model_versions import ModelRouter
from services.edge_http.core.readiness import Readiness, readiness
from services.edge_http.core.upstreams import Upstreams
from services.mesh import discovery
from services.mesh.config import Settings
from services.mesh.discovery.base import UPSTREAM_SERVICES


class EdgeCore:
    def __init__(self, settings: Settings) -> None:
        """Made on the event loop that serves the front ends (the upstream clients live on it)."""
        self.settings = settings
        self.upstreams = Upstreams(settings, discovery.for_settings(settings))
        self.guard = Guard(settings)
        self.catalog = Catalog(ModelRouter(settings.model_weights, settings.model_aliases), self.upstreams, self.guard)
        calls = MeshCalls(self.upstreams, settings)
        self.generations = Generations(settings, self.guard, self.catalog, calls)
        self.embeddings = Embeddings(settings, self.guard, self.catalog, calls)

    async def readiness(self) -> Readiness:
        """Whether requests can be served now, per service and per model."""
        return readiness(UPSTREAM_SERVICES, await self.upstreams.health())

    async def close(self) -> None:
        await self.upstreams.close()
