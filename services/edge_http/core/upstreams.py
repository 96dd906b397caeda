"""The edge's gRPC clients of preprocess, inference and cache (mTLS as the `edge` identity).

One balanced pool per service, fed by discovery. A call that fails on an instance before any
of its answer was used, for a reason that is the instance's (down, broken, overloaded), is
tried again on each other instance not yet tried; a grpc.health.v1 Watch stream per instance
keeps NOT_SERVING (draining, hung) instances out of the rotation, and a WatchLoad stream per
chat model instance keeps its reported load current for routing (prefix_routing.py).
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

from services.edge_http.core.balancer import Choose, Endpoint, NoInstance, Pool, ReportedLoad
from services.edge_http.core.failures import unavailable
from services.edge_http.core.metrics import UPSTREAM_EJECTIONS, UPSTREAM_RETRIES
from services.edge_http.core.model_versions import ReasoningTags, Served
from services.edge_http.core.prefix_routing import PrefixRouter
from services.edge_http.core.readiness import Probe
from services.mesh.config import Settings
from services.mesh.contracts.tool_formats import ToolFormat
from services.mesh.discovery.base import UPSTREAM_SERVICES, Discovery, Instance
from services.mesh.rpc.channels import aio_channel
from services.mesh.rpc.faults import is_instance_fault
from services.mesh.rpc.health import SERVING, check_async
from services.mesh.rpc.tls import CertificateWatch
from services.mesh.stubs.inference_pb2 import ListModelsRequest, ModelInfo, WatchLoadRequest
from services.mesh.stubs.inference_pb2_grpc import InferenceStub

log = logging.getLogger(__name__)

IDENTITY = "edge"
# An instance of any service; inference ones say what they serve (ListModels) once asked.
Upstream = Endpoint[ModelInfo]
Accept = Callable[[Upstream], bool] | None


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
                lambda instance: aio_channel(settings, instance.address, IDENTITY, instance.tls_name),
                on_eject=self._ejected,
            )
            for svc in UPSTREAM_SERVICES
        }
        self._router = PrefixRouter(self.pools["inference"]) if settings.prefix_routing else None
        # Channels keep the client certificate they were opened with: a renewed one (cert-manager
        # replaces the files) takes new channels.
        self._certificate = None if settings.insecure else CertificateWatch(settings, IDENTITY)
        for svc, pool in self.pools.items():
            discovery.watch(svc, lambda instances, pool=pool: self._update(pool, instances))
        self._watchers: dict[int, asyncio.Task] = {}
        self._load_watchers: dict[int, asyncio.Task] = {}
        self._closing: set[asyncio.Task] = set()  # old channels finishing their calls
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
        self._retire(pool)

    def _retire(self, pool: Pool) -> None:
        retired, pool.retired = pool.retired, []
        for channel in retired:
            # Calls still running on a removed instance get the time it takes to drain and stop.
            self._loop.call_later(self._settings.stop_wait_s, lambda c=channel: asyncio.ensure_future(c.close()))

    def _renew_channels(self) -> None:
        """New channels to every instance with the renewed certificate. Calls running on the old
        ones finish there (up to a generation's deadline); the watches move at once, so no
        instance looks unhealthy meanwhile."""
        for pool in self.pools.values():
            pool.renew_channels()
            retired, pool.retired = pool.retired, []
            for channel in retired:
                closing = asyncio.ensure_future(channel.close(grace=self._settings.generate_timeout_s))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        for tasks in (self._watchers, self._load_watchers):
            for task in tasks.values():
                task.cancel()
            tasks.clear()

    def _ejected(self, endpoint: Upstream) -> None:
        UPSTREAM_EJECTIONS.labels(endpoint.instance.service).inc()
        self._forget(endpoint)

    def _forget(self, endpoint: Upstream) -> None:
        """An inference instance that failed or stopped serving may have lost its prefix cache."""
        if self._router is not None and endpoint.instance.service == "inference":
            self._router.forget(endpoint.instance.key)

    async def _check_health_forever(self) -> None:
        """One grpc.health.v1 Watch stream per instance: a draining or hung instance pushes
        NOT_SERVING the moment it changes, and no new call is made to it for the check. Chat model
        instances that serve also push their load (WatchLoad)."""
        while True:
            if self._certificate is not None and self._certificate.changed() is not None:
                self._renew_channels()
            current = {id(e): e for pool in self.pools.values() for e in pool.endpoints}
            _keep(self._watchers, current, lambda e: True, self._watch_health)
            _keep(self._load_watchers, current, _reports_load, self._watch_load)
            await asyncio.sleep(self._settings.health_watch_interval_s)

    async def _watch_load(self, endpoint: Upstream) -> None:
        try:
            async for report in endpoint.stub(InferenceStub).WatchLoad(WatchLoadRequest()):
                endpoint.reported = ReportedLoad(
                    report.waiting, report.running, report.kv_blocks_free, report.kv_blocks_total
                )
        except grpc.aio.AioRpcError:
            pass
        endpoint.reported = None  # stale from now on; watched again once it serves

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
        # The stream ended: the instance stopped or is unreachable; watched again after health_watch_interval_s.
        self._set_health(endpoint, False)

    def _set_health(self, endpoint: Upstream, healthy: bool) -> None:
        if not healthy:
            self._forget(endpoint)
        if endpoint.healthy != healthy:
            log.warning(
                "%s at %s is %s",
                endpoint.instance.service,
                endpoint.instance.address,
                "SERVING again" if healthy else "not SERVING",
            )
        endpoint.healthy = healthy

    async def _describe(self, endpoint: Upstream) -> None:
        if endpoint.info is None:
            reply = await endpoint.stub(InferenceStub).ListModels(
                ListModelsRequest(), timeout=self._settings.upstream_timeout_s
            )
            endpoint.info = reply.models[0]

    def describing(self) -> bool:
        """Some inference instance has not said yet what it serves (it is starting)."""
        return any(e.info is None for e in self.pools["inference"].endpoints)

    async def describe_all(self) -> None:
        """Ask inference instances not yet described what they serve (a request that arrives before
        their health watch did); one that cannot answer stays undescribed."""
        pending = [e for e in self.pools["inference"].endpoints if e.info is None]
        await asyncio.gather(*(self._describe(e) for e in pending), return_exceptions=True)

    def served(self) -> list[Served]:
        """What every inference instance that has described itself serves."""
        return [_served(e) for e in self.pools["inference"].endpoints if e.info is not None]

    def by_prefix(self, token_ids: list[int]) -> Choose[ModelInfo] | None:
        """How to choose the inference instance for this prompt (None: the least busy)."""
        router = self._router
        if router is None:
            return None
        hashes = router.hashes(token_ids)
        return lambda usable: router.choose(usable, hashes)

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
        choose: Choose[ModelInfo] | None = None,
        **call: Any,
    ) -> AsyncIterator:
        """A server-streaming call, retried on another instance if it fails before a message that
        `commits` it: messages before that one (e.g. tokens whose text is still held back) are
        kept back too, so a retry is invisible to the caller. `choose` picks among usable instances."""
        attempts = _Call(service, self.pools[service], accept, choose)
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
        timeout = self._settings.health_check_timeout_s
        serving = await asyncio.gather(*(check_async(e.channel, timeout=timeout) for e in endpoints))
        if self.describing():
            await self.describe_all()
        return [
            Probe(e.instance.service, e.instance.address, ok, e.info.id if e.info is not None else None)
            for e, ok in zip(endpoints, serving, strict=True)
        ]

    async def close(self) -> None:
        tasks = [self._health_task, *self._watchers.values(), *self._load_watchers.values()]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        self._discovery.close()
        await asyncio.gather(*(e.channel.close() for pool in self.pools.values() for e in pool.endpoints))


def _reports_load(endpoint: Upstream) -> bool:
    info = endpoint.info
    return endpoint.healthy and info is not None and (info.kind or "chat") == "chat"


def _keep(
    tasks: dict[int, asyncio.Task],
    endpoints: dict[int, Upstream],
    wanted: Callable[[Upstream], bool],
    watch: Callable[[Upstream], Any],
) -> None:
    """One running `watch` task per wanted endpoint: ended ones restarted, gone ones cancelled."""
    for key in set(tasks) - set(endpoints):
        tasks.pop(key).cancel()
    for key, endpoint in endpoints.items():
        if wanted(endpoint) and (key not in tasks or tasks[key].done()):
            tasks[key] = asyncio.create_task(watch(endpoint))


@dataclass
class _Call:
    """One logical call to a service: the instances tried so far, each attempt's outcome reported
    to the pool, and whether a failure may be retried on another instance."""

    service: str
    pool: Pool[ModelInfo]
    accept: Accept
    choose: Choose[ModelInfo] | None = None
    tried: list[str] = field(default_factory=list)

    def pick(self) -> Upstream:
        try:
            return self.pool.pick(self.tried, self.accept, self.choose)
        except NoInstance as err:
            raise unavailable(str(err)) from err

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
        """An instance's fault, or its being overloaded, is worth a try on an instance not tried yet;
        a request's own error would only fail again."""
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
