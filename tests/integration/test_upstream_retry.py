"""The edge's streaming retry against two real (plaintext, in-process) gRPC inference servers:
a stream that dies before its first visible text is replayed on the other instance, one that
dies after it is not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio
import pytest

from services.edge_http.core.upstreams import Upstreams
from services.mesh.config import Settings
from services.mesh.discovery.static import StaticDiscovery
from services.mesh.stubs import common_pb2, inference_pb2, inference_pb2_grpc


class ScriptedInference(inference_pb2_grpc.InferenceServicer):
    """Streams the given texts, then fails with UNAVAILABLE (like a replica killed mid-stream)
    or, with `finish`, ends the stream normally."""

    def __init__(self, texts: list[str], finish: bool) -> None:
        self.texts, self.finish, self.calls = texts, finish, 0

    async def Generate(self, _: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator:
        self.calls += 1
        for index, text in enumerate(self.texts):
            yield inference_pb2.GenerateChunk(token_ids=[index], text=text)
        if not self.finish:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "replica went away")
        yield inference_pb2.GenerateChunk(finish_reason=common_pb2.FINISH_REASON_LENGTH)


async def _serve(servicer: ScriptedInference) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _shows_text(chunk: inference_pb2.GenerateChunk) -> bool:
    return bool(chunk.text or chunk.finish_reason)


async def _collect(
    failing: ScriptedInference, healthy: ScriptedInference, commits: Callable = _shows_text
) -> tuple[list[str], Exception | None]:
    servers = [await _serve(failing), await _serve(healthy)]
    addresses = [address for _, address in servers]
    upstreams = Upstreams(
        Settings(insecure=True), StaticDiscovery({"inference": addresses, "preprocess": ["x:1"], "cache": ["x:1"]})
    )
    pool = upstreams.pools["inference"]
    # The failing instance is picked first: it has fewer calls in flight than its twin.
    next(e for e in pool.endpoints if e.instance.address == addresses[1]).outstanding = 1
    stub, request = inference_pb2_grpc.InferenceStub, inference_pb2.GenerateRequest()
    texts, error = [], None
    try:
        async for chunk in upstreams.stream("inference", stub, "Generate", request, commits=commits):
            texts.append(chunk.text)
    except grpc.aio.AioRpcError as err:
        error = err
    finally:
        await upstreams.close()
        for server, _ in servers:
            await server.stop(0)
    return texts, error


def test_a_stream_that_dies_before_visible_text_is_replayed_elsewhere() -> None:
    failing, healthy = ScriptedInference(["", ""], finish=False), ScriptedInference(["Hel", "lo"], finish=True)
    texts, error = asyncio.run(_collect(failing, healthy))
    assert error is None
    # The held-back empty chunks of the failed attempt never reach the caller.
    assert texts == ["Hel", "lo", ""]
    assert (failing.calls, healthy.calls) == (1, 1)


def test_a_stream_that_dies_after_visible_text_is_not_replayed() -> None:
    failing, healthy = ScriptedInference(["", "Hi"], finish=False), ScriptedInference(["Hel", "lo"], finish=True)
    texts, error = asyncio.run(_collect(failing, healthy))
    assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE
    assert texts == ["", "Hi"]
    assert healthy.calls == 0


@pytest.mark.parametrize("texts", [["", ""], []])
def test_a_stream_that_ends_without_committing_still_delivers_what_it_sent(texts: list[str]) -> None:
    done, other = ScriptedInference(texts, finish=True), ScriptedInference(["x"], finish=True)
    done_texts, error = asyncio.run(_collect(done, other, commits=lambda chunk: bool(chunk.text)))
    assert error is None
    assert done_texts == [*texts, ""]
    assert other.calls == 0
