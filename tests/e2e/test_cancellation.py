"""A client that goes away stops the work it started, all the way down to the model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
from meshproc import Mesh, wait_for

from services.mesh.rpc.certs import ca_paths, service_paths
from services.mesh.stubs import common_pb2, inference_pb2, inference_pb2_grpc

MAX_TOKENS = 1500


def test_closing_the_http_stream_stops_generation(mesh: Mesh) -> None:
    cancelled_before = mesh.metric("inference", "sluice_inference_sequences_finished_total", reason="cancelled")
    tokens_before = mesh.metric("inference", "sluice_inference_generated_tokens_total")
    body = {
        "model": "sluice-tiny",
        "messages": [{"role": "user", "content": "talk for a long time"}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{mesh.base_url}/chat/completions", json=body) as reply:
            assert reply.status_code == 200
            lines = reply.iter_lines()
            received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in received)

    assert wait_for(
        lambda: (
            mesh.metric("inference", "sluice_inference_sequences_finished_total", reason="cancelled")
            == cancelled_before + 1
        )
    ), "the inference service never saw the cancellation"
    generated = mesh.metric("inference", "sluice_inference_generated_tokens_total") - tokens_before
    assert 2 <= generated < MAX_TOKENS  # six SSE lines carry at least two content events
    # Once cancelled, the counter stays put: the sequence is out of the engine.
    assert mesh.metric("inference", "sluice_inference_generated_tokens_total") - tokens_before == generated


def test_cancelling_the_grpc_call_frees_the_engine_for_the_next_request(mesh: Mesh) -> None:
    own = service_paths(mesh.certs_dir, "edge")
    creds = grpc.ssl_channel_credentials(
        ca_paths(mesh.certs_dir).cert.read_bytes(), own.key.read_bytes(), own.cert.read_bytes()
    )
    tokens_before = mesh.metric("inference", "sluice_inference_generated_tokens_total")
    request = inference_pb2.GenerateRequest(
        request_id="t",
        model="sluice-tiny",
        token_ids=[5, 6, 7],
        sampling=common_pb2.SamplingParams(max_tokens=2000, ignore_eos=True),
    )
    with grpc.secure_channel(mesh.address("inference"), creds) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        call = stub.Generate(request, timeout=60)
        first = next(call)
        assert first.token_ids
        call.cancel()
        # The engine runs sequences in order, so this answers only after the cancelled one left.
        short = inference_pb2.GenerateRequest(
            request_id="u", token_ids=[5, 6, 7], sampling=common_pb2.SamplingParams(max_tokens=3)
        )
        chunks = list(stub.Generate(short, timeout=30))
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 3
    generated = mesh.metric("inference", "sluice_inference_generated_tokens_total") - tokens_before
    assert generated < 2000 + 3, "the cancelled sequence ran to its end"


ABANDONED = 40


def test_abandoned_non_streaming_requests_stop_generating(mesh: Mesh) -> None:
    """What the openai SDK's timeout-and-retry and a Dify user closing a blocking request do: the
    client gives up on a whole (non-streamed) answer. Each generation must leave the engine then,
    not run to its max_tokens for nobody."""
    cancelled_before = mesh.metric("inference", "sluice_inference_sequences_finished_total", reason="cancelled")
    tokens_before = mesh.metric("inference", "sluice_inference_generated_tokens_total")
    body = {"model": "sluice-tiny", "max_tokens": 2000, "ignore_eos": True}

    def abandon(index: int) -> None:
        messages = [{"role": "user", "content": f"abandoned {index}"}]
        try:
            httpx.post(f"{mesh.base_url}/chat/completions", json=body | {"messages": messages}, timeout=0.5)
        except httpx.TimeoutException:
            return
        raise AssertionError("a 2000-token answer arrived within half a second")

    with ThreadPoolExecutor(ABANDONED) as pool:
        list(pool.map(abandon, range(ABANDONED)))
    assert wait_for(
        lambda: (
            mesh.metric("inference", "sluice_inference_sequences_finished_total", reason="cancelled")
            == cancelled_before + ABANDONED
        ),
        timeout=60,
    ), "the abandoned generations kept running"
    assert wait_for(lambda: mesh.metric("inference", "sluice_inference_running_sequences") == 0, timeout=10)
    generated = mesh.metric("inference", "sluice_inference_generated_tokens_total") - tokens_before
    assert generated < ABANDONED * 2000 / 4  # far from running to their end
    # The engine is free: the next request is answered at once.
    short = {"model": "sluice-tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "next"}]}
    assert httpx.post(f"{mesh.base_url}/chat/completions", json=short, timeout=30).status_code == 200
