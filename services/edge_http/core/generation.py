"""Chat and text completions through the mesh, whichever front end a request came to.

`admit` decides everything about a request before it costs anything: the deployment's limits,
the model version (catalog.py), the plan (plans.py), and the caller's tokens reserved. `open`
opens its choices' runs (cache or generation, first event received): up to there a failure is a
plain error for the front end to answer with. The opened generation's events then come as they
are produced (a stream) or once every choice has finished (whole), and each run settles what it
used as its events end.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from opentelemetry import trace

from services.edge_http.core import choices
from services.edge_http.core.accounting import Settle, audited, shared_settlement
from services.edge_http.core.admission import Caller, Guard
from services.edge_http.core.catalog import Catalog
from services.edge_http.core.context import RequestContext
from services.edge_http.core.events import OutputEvent, WholeAnswer
from services.edge_http.core.mesh_calls import MeshCalls
from services.edge_http.core.metrics import CACHE_RESULTS, TIME_TO_FIRST_TOKEN
from services.edge_http.core.plans import GenerationRequest, Plan, plan
from services.edge_http.core.runs import Run, RunOpener
from services.mesh.config import Settings


@dataclass(frozen=True)
class Admitted:
    """A request with its plan, the caller's tokens reserved for it."""

    plan: Plan
    settle: Settle


@dataclass(frozen=True)
class Opened:
    """A request whose choices have all opened."""

    plan: Plan
    runs: list[Run]

    @property
    def cache_status(self) -> str:
        """One choice's cache outcome, or each distinct one for several choices (e.g. `hit,miss`)."""
        return ",".join(sorted({run.cache_status for run in self.runs}))

    def events(self) -> AsyncIterator[OutputEvent]:
        """The choices' events as they come, then the request's usage."""
        plan = self.plan
        return choices.streamed(self.runs, plan.rules, plan.echo, plan.prompt_tokens)

    async def whole(self) -> WholeAnswer:
        """Each choice's output complete, and the request's usage."""
        plan = self.plan
        return await choices.whole(self.runs, plan.rules, plan.echo, plan.prompt_tokens)


class Generations:
    def __init__(self, settings: Settings, guard: Guard, catalog: Catalog, calls: MeshCalls) -> None:
        self._settings = settings
        self._guard = guard
        self._catalog = catalog
        self._calls = calls
        self._opener = RunOpener(calls, settings.cache_enabled)

    async def admit(self, caller: Caller, body: GenerationRequest, context: RequestContext) -> Admitted:
        trace.get_current_span().set_attributes(
            {"sluice.request_id": context.request_id, "gen_ai.request.model": body.model}
        )
        self._guard.check(body)
        target = await self._catalog.target(caller, body.model, "chat", context)
        planned = await plan(self._calls, body, target, context.request_id, self._settings.max_tokens_limit)
        settle = audited(await self._guard.reserve(caller, planned.most_tokens), context.record)
        return Admitted(planned, settle)

    async def open(self, admitted: Admitted, context: RequestContext) -> Opened:
        planned = admitted.plan
        sizes = [len(prompt.token_ids) for prompt in planned.prompts for _ in range(planned.choices)]
        settles = shared_settlement(admitted.settle, sizes, planned.prompt_tokens)
        try:
            runs = await choices.open_choices(
                self._opener, planned.target, planned.prompts, planned.choices, settles, context
            )
        except BaseException:
            await admitted.settle(0)  # nothing was generated: the reservation goes back
            raise
        opened = Opened(planned, runs)
        for run in runs:
            CACHE_RESULTS.labels(run.cache_status).inc()
        TIME_TO_FIRST_TOKEN.labels(planned.target.id).observe(time.perf_counter() - context.started)
        trace.get_current_span().set_attribute("sluice.cache", opened.cache_status)
        return opened
