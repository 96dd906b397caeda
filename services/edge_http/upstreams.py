"""The edge's gRPC clients of preprocess, inference and cache (mTLS as the `edge` identity)."""

from __future__ import annotations

import asyncio

import grpc.aio

from services.mesh.channels import aio_channel
from services.mesh.config import Settings
from services.mesh.discovery import UPSTREAM_SERVICES, StaticDiscovery
from services.mesh.health import check_async
from services.mesh.stubs import cache_pb2_grpc, inference_pb2_grpc, preprocess_pb2_grpc

IDENTITY = "edge"


class Upstreams:
    def __init__(self, settings: Settings, discovery: StaticDiscovery) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {
            svc: aio_channel(settings, discovery.address(svc), IDENTITY) for svc in UPSTREAM_SERVICES
        }
        self.preprocess = preprocess_pb2_grpc.PreprocessStub(self._channels["preprocess"])
        self.inference = inference_pb2_grpc.InferenceStub(self._channels["inference"])
        self.cache = cache_pb2_grpc.CacheStub(self._channels["cache"])

    async def health(self) -> dict[str, bool]:
        results = await asyncio.gather(*(check_async(ch, timeout=2.0) for ch in self._channels.values()))
        return dict(zip(self._channels, results, strict=True))

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self._channels.values()))
