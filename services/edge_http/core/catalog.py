"""The models the mesh serves now, as a caller may use them: which model version serves a request
(the name resolved through aliases, weights and the caller's pin, checked against the caller's
access and the endpoint's kind), and which models a caller sees listed."""

from __future__ import annotations

from opentelemetry import trace

from services.edge_http.core.admission import Caller, Guard
from services.edge_http.core.context import VERSION_HEADER, RequestContext
from services.edge_http.core.failures import EdgeError, Failure, unavailable
from services.edge_http.core.model_versions import ModelRouter, Served, UnknownModel, UnknownVersion
from services.edge_http.core.upstreams import Upstreams

# The model kinds and the endpoint family that serves each (named in the error for the wrong one).
KIND_ENDPOINTS = {"chat": "/v1/chat/completions", "embedding": "/v1/embeddings"}


class Catalog:
    def __init__(self, router: ModelRouter, upstreams: Upstreams, guard: Guard) -> None:
        self._router = router
        self._upstreams = upstreams
        self._guard = guard

    async def target(self, caller: Caller, name: str, kind: str, context: RequestContext) -> Served:
        """The model version that serves this request; labels the request's record and trace with it."""
        model_id = self._router.resolve(name)
        self._guard.allow_model(caller, name, model_id)
        upstreams = self._upstreams
        try:
            if not any(s.id == model_id for s in upstreams.served()):
                await upstreams.describe_all()
            target = self._router.choose(model_id, upstreams.served(), context.pinned_version)
        except UnknownModel:
            if upstreams.describing():
                raise unavailable("inference instances are still starting") from None
            raise EdgeError(
                Failure.NOT_FOUND, f"the model `{name}` does not exist", param="model", code="model_not_found"
            ) from None
        except UnknownVersion as err:
            raise EdgeError(Failure.NOT_FOUND, str(err), param=VERSION_HEADER, code="model_version_not_found") from None
        if target.kind != kind:
            raise EdgeError(
                Failure.INVALID,
                f"`{name}` is a {target.kind} model: use {KIND_ENDPOINTS.get(target.kind, 'another endpoint')}",
                param="model",
                code="wrong_model_kind",
            )
        context.record.model = target.id
        trace.get_current_span().set_attributes(
            {"gen_ai.response.model": target.id, "sluice.model.version": target.version}
        )
        return target

    async def visible(self, caller: Caller) -> list[tuple[str, Served]]:
        """Every model id (and alias of one) with at least one healthy instance that the caller may use."""
        await self._upstreams.describe_all()
        serving = {s.id: s for s in self._upstreams.served() if s.healthy}
        names = {model_id: model_id for model_id in serving}
        names |= {alias: target for alias, target in self._router.aliases.items() if target in serving}
        return [
            (name, serving[target])
            for name, target in sorted(names.items())
            if caller is None or caller.allows(name) or caller.allows(target)
        ]
