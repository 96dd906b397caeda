"""The edge's calls into the mesh, one method per RPC it makes: preprocess (render a chat,
tokenize a prompt), cache (look up, store), inference (generate, embed). Each call carries the
request id and the mesh's deadline; a failure becomes an EdgeError (or, for the cache, a miss)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message

from services.edge_http.core.failures import from_rpc_error
from services.edge_http.core.metrics import UPSTREAM_ERRORS
from services.edge_http.core.model_versions import Served
from services.edge_http.core.upstreams import Accept, Upstream, Upstreams
from services.mesh.config import Settings
from services.mesh.stubs import (
    cache_pb2,
    cache_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    preprocess_pb2,
    preprocess_pb2_grpc,
)

STUBS = {
    "preprocess": preprocess_pb2_grpc.PreprocessStub,
    "inference": inference_pb2_grpc.InferenceStub,
    "cache": cache_pb2_grpc.CacheStub,
}

log = logging.getLogger(__name__)


def serves(target: Served) -> Callable[[Upstream], bool]:
    """Instances of exactly the chosen model version."""
    return lambda e: e.info is not None and (e.info.id, e.info.version) == (target.id, target.version)


class MeshCalls:
    def __init__(self, upstreams: Upstreams, settings: Settings) -> None:
        self._up = upstreams
        self._settings = settings

    @staticmethod
    def _metadata(request_id: str) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", request_id),)

    async def _unary(self, service: str, method: str, request: Message, request_id: str, accept: Accept = None) -> Any:
        """A balanced unary call with the mesh's deadline and the request id; the caller decides what a
        failure means."""
        return await self._up.unary(
            service,
            STUBS[service],
            method,
            request,
            accept=accept,
            timeout=self._settings.upstream_timeout_s,
            metadata=self._metadata(request_id),
        )

    async def render_chat(self, request: preprocess_pb2.RenderChatRequest) -> preprocess_pb2.PreprocessReply:
        return await self._preprocess("RenderChat", request, request.request_id)

    async def tokenize(self, request: preprocess_pb2.TokenizeRequest) -> preprocess_pb2.PreprocessReply:
        return await self._preprocess("Tokenize", request, request.request_id)

    async def _preprocess(self, method: str, request: Message, request_id: str) -> preprocess_pb2.PreprocessReply:
        try:
            return await self._unary("preprocess", method, request, request_id)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, "preprocess") from err

    async def embed(self, target: Served, request: inference_pb2.EmbedRequest) -> inference_pb2.EmbedReply:
        try:
            return await self._unary("inference", "Embed", request, request.request_id, accept=serves(target))
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, "inference") from err

    async def lookup(self, key: str, request_id: str) -> cache_pb2.Completion | None:
        """The cached completion, or None: on a miss, and when the cache fails (it is an
        optimisation: its failure must never fail the request)."""
        try:
            request = cache_pb2.LookupRequest(cache_key=key, request_id=request_id)
            return await self._unary("cache", "Lookup", request, request_id)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                UPSTREAM_ERRORS.labels("cache", err.code().name).inc()
                log.warning("cache lookup failed (%s); generating instead", err.code().name)
            return None

    async def store(self, key: str, completion: cache_pb2.Completion, request_id: str) -> None:
        try:
            request = cache_pb2.StoreRequest(cache_key=key, completion=completion, request_id=request_id)
            await self._unary("cache", "Store", request, request_id)
        except grpc.aio.AioRpcError as err:
            UPSTREAM_ERRORS.labels("cache", err.code().name).inc()
            log.warning("cache store failed (%s)", err.code().name)

    def generate(self, target: Served, request: inference_pb2.GenerateRequest) -> AsyncIterator[Any]:
        """The generation's chunks from an instance of the target version (chosen by prefix),
        retried elsewhere until its first visible text."""
        return self._up.stream(
            "inference",
            STUBS["inference"],
            "Generate",
            request,
            accept=serves(target),
            choose=self._up.by_prefix(list(request.token_ids)),
            # A chunk with no text yet (the detokenizer holds a partial character) shows the
            # client nothing, so a failure after it can still be retried elsewhere.
            commits=lambda chunk: bool(chunk.text or chunk.finish_reason),
            timeout=self._settings.generate_timeout_s,
            metadata=self._metadata(request.request_id),
        )
