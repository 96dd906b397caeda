"""gRPC wiring of the cache service over the in-memory CompletionStore."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc.aio
from opentelemetry import trace
from prometheus_client import Counter, Gauge

from services.cache.store import CompletionStore, Store
from services.mesh.config import Settings
from services.mesh.contracts.errors import InvalidArgument, NotFound
from services.mesh.rpc.server import GrpcService, serve
from services.mesh.stubs import cache_pb2, cache_pb2_grpc

LOOKUPS = Counter("sluice_cache_lookups_total", "Cache lookups by result", ["result"])
STORES = Counter("sluice_cache_stores_total", "Completions stored")
EVICTIONS = Counter("sluice_cache_evictions_total", "Entries evicted to respect the bounds")
ENTRIES = Gauge("sluice_cache_entries", "Entries in the store")
BYTES = Gauge("sluice_cache_bytes", "Bytes held by the store")


def _require_key(key: str) -> None:
    if not key:
        raise InvalidArgument("cache_key must not be empty", "cache_key")


class CacheServicer(cache_pb2_grpc.CacheServicer):
    def __init__(self, store: Store) -> None:
        self._store = store
        ENTRIES.set_function(lambda: store.stats().entries)
        BYTES.set_function(lambda: store.stats().bytes)

    # The store may be Redis, a network round trip: on a thread, so the event loop keeps serving.
    async def Lookup(self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext) -> cache_pb2.Completion:
        _require_key(request.cache_key)
        value = await asyncio.to_thread(self._store.get, request.cache_key)
        LOOKUPS.labels("hit" if value is not None else "miss").inc()
        trace.get_current_span().set_attribute("sluice.cache.hit", value is not None)
        if value is None:
            raise NotFound("no cached completion for this key")
        return cache_pb2.Completion.FromString(value)

    async def Store(self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext) -> cache_pb2.StoreReply:
        _require_key(request.cache_key)
        stored = await asyncio.to_thread(self._store.put, request.cache_key, request.completion.SerializeToString())
        trace.get_current_span().set_attributes(
            {"sluice.cache.stored": stored, "sluice.cache.bytes": request.completion.ByteSize()}
        )
        if stored:
            STORES.inc()
        return cache_pb2.StoreReply(stored=stored)


def make_store(settings: Settings) -> Store:
    bounds = (settings.cache_max_entries, settings.cache_max_bytes, settings.cache_ttl_s)
    if settings.cache_backend == "redis":
        from services.cache.redis_store import RedisStore

        return RedisStore(settings.redis_url, *bounds, on_evict=EVICTIONS.inc)
    return CompletionStore(*bounds, on_evict=EVICTIONS.inc)


def run(settings: Settings, ready_file: Path | None) -> int:
    store = make_store(settings)
    spec = GrpcService(
        name="cache",
        service_names=[cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name],
        register=lambda server: cache_pb2_grpc.add_CacheServicer_to_server(CacheServicer(store), server),
    )
    return serve(settings, spec, settings.cache_port, ready_file)
