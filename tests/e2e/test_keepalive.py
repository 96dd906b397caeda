"""A stream whose first token is slow to come (a long queue or prefill) is kept alive with
`: ping` comments; a fast one starts with data at once, and a slow failure ends as an error
event instead of a hang."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from meshproc import Edge, Mesh
from scripted_inference import ScriptedModel, scripted_edge

from services.mesh.stubs import inference_pb2

FIRST_TOKEN_AFTER_S = 2.0
INTERVAL_S = 0.4


def _slow_start(request: inference_pb2.GenerateRequest, context: grpc.ServicerContext) -> list[str]:
    """The first token after FIRST_TOKEN_AFTER_S; with max_tokens 1, a failure instead."""
    time.sleep(FIRST_TOKEN_AFTER_S)
    if request.sampling.max_tokens == 1:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "scripted failure after a long prefill")
    return ["late"]


@pytest.fixture(scope="module")
def slow_edge(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    model = ScriptedModel(inference_pb2.ModelInfo(id="sluice-tiny", kind="chat"), _slow_start)
    workdir = tmp_path_factory.mktemp("keepalive")
    with scripted_edge(mesh, workdir, model, "--sse-keepalive-s", str(INTERVAL_S)) as edge:
        yield edge


def _stream(edge: Edge, max_tokens: int) -> tuple[int, list[str]]:
    body = {
        "model": "sluice-tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    headers = {"Cache-Control": "no-cache"}
    with httpx.stream("POST", f"{edge.base_url}/chat/completions", json=body, headers=headers, timeout=30) as reply:
        return reply.status_code, [block for block in reply.read().decode().split("\n\n") if block]


def test_pings_keep_a_slow_stream_alive_until_its_tokens_come(slow_edge: Edge) -> None:
    status, blocks = _stream(slow_edge, 4)
    assert status == 200
    pings = [b for b in blocks if b.startswith(":")]
    assert all(b == ": ping" for b in pings)
    # One per interval while waiting: about FIRST_TOKEN_AFTER_S / INTERVAL_S of them, all before the data.
    assert 3 <= len(pings) <= FIRST_TOKEN_AFTER_S / INTERVAL_S + 1
    assert blocks[: len(pings)] == pings
    assert '"content":"late"' in "".join(blocks) and blocks[-1] == "data: [DONE]"


def test_a_failure_after_pings_is_an_error_event(slow_edge: Edge) -> None:
    status, blocks = _stream(slow_edge, 1)
    assert status == 200 and blocks[0] == ": ping"
    assert "scripted failure after a long prefill" in blocks[-2] and '"error"' in blocks[-2]
    assert blocks[-1] == "data: [DONE]"


def test_a_fast_stream_has_no_pings(mesh: Mesh) -> None:
    body = {"model": "sluice-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{mesh.base_url}/chat/completions", json=body, timeout=30) as reply:
        text = reply.read().decode()
    assert reply.status_code == 200 and text.startswith("data: ") and ": ping" not in text
