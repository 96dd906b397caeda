"""The edge's gRPC clients of preprocess, inference and cache (mTLS as the `edge` identity).

One balanced pool per service, fed by discovery. A call that fails on an instance before any
of its answer was used is retried once on another instance; a grpc.health.v1 Watch stream per
instance keeps NOT_SERVING (draining, hung) instances out of the rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message
from grpc_health.v1.health_pb2 import HealthCheckRequest
from grpc_health.v1.health_pb2_grpc import HealthStub

from services.edge_http.errors import RETRY_AFTER_S, OpenAIError
from services.edge_http.metrics import UPSTREAM_EJECTIONS, UPSTREAM_RETRIES
from services.edge_http.models import Served
from services.edge_http.openai_schema import ReasoningTags
from services.edge_http.readiness import Probe
from services.mesh.balancer import Endpoint, NoInstance, Pool
from services.mesh.channels import aio_channel
from services.mesh.config import Settings
from services.mesh.discovery import UPSTREAM_SERVICES, Discovery, Instance
from services.mesh.errors import is_instance_fault
from services.mesh.health import SERVING, check_async
from services.mesh.stubs.inference_pb2 import ListModelsRequest, ModelInfo
from services.mesh.stubs.inference_pb2_grpc import InferenceStub
from services.mesh.tool_formats import ToolFormat

log = logging.getLogger(__name__)

IDENTITY = "edge"
# An instance of any service; inference ones say what they serve (ListModels) once asked.
Upstream = Endpoint[ModelInfo]
Accept = Callable[[Upstream], bool] | None
HEALTH_INTERVAL_S = 1.0


def _served(endpoint: Upstream) -> Served:
    info = endpoint.info
    reasoning = ReasoningTags(info.reasoning_open, info.reasoning_close) if info.reasoning_open else None
    kind = info.kind or "chat"
    return Served(
        info.id,
        info.version,
        kind,
        info.context_length,
        info.created,
        endpoint.healthy,
        reasoning,
        ToolFormat(info.tool_parser) if info.tool_parser in tuple(ToolFormat) else None,
    )


class Upstreams:
    def __init__(self, settings: Settings, discovery: Discovery) -> None:
        self._settings = settings
        self._discovery = discovery
        self._loop = asyncio.get_running_loop()
        self.pools = {
            svc: Pool[ModelInfo](
                svc,
                lambda address: aio_channel(settings, address, IDENTITY),
                on_eject=lambda _, svc=svc: UPSTREAM_EJECTIONS.labels(svc).inc(),
            )
            for svc in UPSTREAM_SERVICES
        }
        for svc, pool in self.pools.items():
            discovery.watch(svc, lambda instances, pool=pool: self._update(pool, instances))
        self._watchers: dict[int, asyncio.Task] = {}
        self._health_task = asyncio.create_task(self._check_health_forever())

    def _update(self, pool: Pool, instances: list[Instance]) -> None:
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if not on_loop:  # a discovery thread: pools are only touched on the event loop
            self._loop.call_soon_threadsafe(self._update, pool, instances)
            return
        pool.update(instances)
        retired, pool.retired = pool.retired, []
        for channel in retired:
            # Calls still running on a removed instance get the drain grace period to finish.
            self._loop.call_later(self._settings.drain_grace_s + 5, lambda c=channel: asyncio.ensure_future(c.close()))

    async def _check_health_forever(self) -> None:
        """One grpc.health.v1 Watch stream per instance: a draining or hung instance pushes
        NOT_SERVING the moment it changes, and no new call is made to it for the check."""
        watchers = self._watchers
        while True:
            current = {id(e): e for pool in self.pools.values() for e in pool.endpoints}
            for key in set(watchers) - set(current):
                watchers.pop(key).cancel()
            for key, endpoint in current.items():
                if key not in watchers or watchers[key].done():
                    watchers[key] = asyncio.create_task(self._watch_health(endpoint))
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def _watch_health(self, endpoint: Upstream) -> None:
        healthy = False
        try:
            async for reply in HealthStub(endpoint.channel).Watch(HealthCheckRequest()):
                healthy = reply.status == SERVING
                if healthy and endpoint.instance.service == "inference":
                    await self._describe(endpoint)  # routing needs to know what it serves first
                self._set_health(endpoint, healthy)
        except grpc.aio.AioRpcError:
            pass
        # The stream ended: the instance stopped or is unreachable; watched again after HEALTH_INTERVAL_S.
        self._set_health(endpoint, False)

    @staticmethod
    def _set_health(endpoint: Upstream, healthy: bool) -> None:
        if endpoint.healthy != healthy:
            log.warning(
                "%s at %s is %s",
                endpoint.instance.service,
                endpoint.instance.address,
                "SERVING again" if healthy else "not SERVING",
            )
        endpoint.healthy = healthy

    @staticmethod
    async def _describe(endpoint: Upstream) -> None:
        if endpoint.info is None:
            described = await endpoint.stub(InferenceStub).ListModels(ListModelsRequest(), timeout=10)
            endpoint.info = described.models[0]

    async def describe_all(self) -> None:
        """Ask inference instances not yet described what they serve (a request that arrives before
        their health watch did); one that cannot answer stays undescribed."""
        pending = [e for e in self.pools["inference"].endpoints if e.info is None]
        await asyncio.gather(*(self._describe(e) for e in pending), return_exceptions=True)

    def served(self) -> list[Served]:
        """What every inference instance that has described itself serves."""
        return [_served(e) for e in self.pools["inference"].endpoints if e.info is not None]

    async def unary(
        self, service: str, stub_class: type, method: str, request: Message, accept: Accept = None, **call: Any
    ) -> Any:
        """One unary call to an instance `accept` allows (keyword arguments go to the stub: timeout, metadata)."""
        attempts = _Call(service, self.pools[service], accept)
        while True:
            endpoint = attempts.pick()
            try:
                with attempts.attempt(endpoint):
                    return await getattr(endpoint.stub(stub_class), method)(request, **call)
            except grpc.aio.AioRpcError as err:
                if not attempts.may_retry(endpoint, err):
                    raise

    async def stream(
        self,
        service: str,
        stub_class: type,
        method: str,
        request: Message,
        commits: Callable[[Any], bool] = lambda _: True,
        accept: Accept = None,
        **call: Any,
    ) -> AsyncIterator:
        """A server-streaming call, retried on another instance if it fails before a message that
        `commits` it: messages before that one (e.g. tokens whose text is still held back) are
        kept back too, so a retry is invisible to the caller."""
        attempts = _Call(service, self.pools[service], accept)
        while True:
            endpoint = attempts.pick()
            held, committed = [], False
            rpc = getattr(endpoint.stub(stub_class), method)(request, **call)
            try:
                with attempts.attempt(endpoint):
                    async for message in rpc:
                        held.append(message)
                        committed = committed or commits(message)
                        if committed:
                            for kept in held:
                                yield kept
                            held.clear()
                    for kept in held:
                        yield kept  # the stream ended without committing: nothing left to retry for
                return
            except grpc.aio.AioRpcError as err:
                if committed or not attempts.may_retry(endpoint, err):
                    raise
            finally:
                # Client gone or stream abandoned: cancelling the call stops generation upstream.
                rpc.cancel()

    async def health(self) -> list[Probe]:
        """Every instance's answer to a health check now (inference ones with the model they serve)."""
        endpoints = [e for pool in self.pools.values() for e in pool.endpoints]
        serving = await asyncio.gather(*(check_async(e.channel, timeout=2.0) for e in endpoints))
        if any(e.info is None for e in self.pools["inference"].endpoints):
            await self.describe_all()
        return [
            Probe(e.instance.service, e.instance.address, ok, e.info.id if e.info is not None else None)
            for e, ok in zip(endpoints, serving, strict=True)
        ]

    async def close(self) -> None:
        tasks = [self._health_task, *self._watchers.values()]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        self._discovery.close()
        await asyncio.gather(*(e.channel.close() for pool in self.pools.values() for e in pool.endpoints))


@dataclass
class _Call:
    """One logical call to a service: the instances tried so far, each attempt's outcome reported
    to the pool, and whether a failure may be retried on another instance."""

    service: str
    pool: Pool[ModelInfo]
    accept: Accept
    tried: list[str] = field(default_factory=list)

    def pick(self) -> Upstream:
        try:
            return self.pool.pick(self.tried, self.accept)
        except NoInstance as err:
            raise OpenAIError(
                503, str(err), "service_unavailable", code="unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}
            ) from err

    @contextlib.contextmanager
    def attempt(self, endpoint: Upstream) -> Iterator[None]:
        self.pool.started(endpoint)
        fault = False
        try:
            yield
        except grpc.aio.AioRpcError as err:
            fault = is_instance_fault(err)
            raise
        finally:
            self.pool.finished(endpoint, fault)

    def may_retry(self, endpoint: Upstream, err: grpc.aio.AioRpcError) -> bool:
        """An instance's fault, or its being overloaded, is worth one more try elsewhere; a request's
        own error would only fail again."""
        self.tried.append(endpoint.instance.key)
        worth_it = is_instance_fault(err) or err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        if worth_it and self.pool.alternatives(self.tried, self.accept):
            log.warning(
                "%s at %s failed (%s); retrying on another instance",
                self.service,
                endpoint.instance.address,
                err.code().name,
            )
            UPSTREAM_RETRIES.labels(self.service).inc()
            return True
        return False
