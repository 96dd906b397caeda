"""One trace per request across the real mesh, exported over OTLP/gRPC to a real receiver,
and JSON log lines that carry the same request id and trace id."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from meshproc import Mesh, start_mesh, wait_for
from otlp_receiver import OtlpReceiver, ReceivedSpan

SERVER, CLIENT = 2, 3
SERVICES = {"sluice-edge", "sluice-preprocess", "sluice-cache", "sluice-inference"}


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path, model_dir: Path) -> Iterator[tuple]:
    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        mesh = start_mesh(tmp_path_factory.mktemp("traced"), certs_dir, model_dir, env=env)
        try:
            yield mesh, receiver
        finally:
            mesh.stop()


def _one(spans: list[ReceivedSpan], name: str, kind: int | None = None) -> ReceivedSpan:
    found = [s for s in spans if s.name == name and (kind is None or s.kind == kind)]
    assert len(found) == 1, f"{name}: {len(found)} spans in {[s.name for s in spans]}"
    return found[0]


def test_a_streaming_chat_is_one_trace_across_all_four_services(traced: tuple[Mesh, OtlpReceiver]) -> None:
    mesh, receiver = traced
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    client = openai.OpenAI(base_url=mesh.base_url, api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=mesh.model_dir.name,
        messages=[{"role": "user", "content": f"trace me {trace_id}"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        extra_headers={"traceparent": f"00-{trace_id}-{caller_span}-01", "X-Request-Id": f"req-{trace_id[:8]}"},
    )
    usage = next(c.usage for c in raw.parse() if c.usage)
    assert raw.headers["x-request-id"] == f"req-{trace_id[:8]}"

    def whole_trace() -> list[ReceivedSpan]:
        return [s for s in receiver.spans() if s.trace_id == trace_id]

    # The edge's request span, its 4 gRPC client spans, 4 server spans and 3 inference phases.
    assert wait_for(lambda: len(whole_trace()) >= 12, timeout=30), [s.name for s in whole_trace()]
    spans = whole_trace()
    assert len(spans) == 12
    assert {s.service for s in spans} == SERVICES
    by_id = {s.span_id: s for s in spans}

    # The edge continues the caller's trace (the incoming traceparent) ...
    edge = next(s for s in spans if s.service == "sluice-edge" and s.kind == SERVER)
    assert edge.parent_span_id == caller_span
    assert edge.attributes["gen_ai.request.model"] == mesh.model_dir.name
    assert edge.attributes["sluice.stream"] is True
    assert edge.attributes["sluice.cache"] == "miss"
    assert edge.attributes["sluice.request_id"] == f"req-{trace_id[:8]}"
    assert 200 in (edge.attributes.get("http.status_code"), edge.attributes.get("http.response.status_code"))

    # ... and every gRPC hop is a client span of the edge with the backend's server span under it.
    for method, service in (
        ("/sluice.v1.Preprocess/RenderChat", "sluice-preprocess"),
        ("/sluice.v1.Cache/Lookup", "sluice-cache"),
        ("/sluice.v1.Inference/Generate", "sluice-inference"),
        ("/sluice.v1.Cache/Store", "sluice-cache"),
    ):
        call = _one([s for s in spans if s.service == "sluice-edge"], method, CLIENT)
        served = _one([s for s in spans if s.service == service], method, SERVER)
        assert served.parent_span_id == call.span_id
        parent = by_id[call.parent_span_id]
        while parent.span_id != edge.span_id:  # any in-process spans between lead back to the request
            parent = by_id[parent.parent_span_id]

    preprocess = _one(spans, "/sluice.v1.Preprocess/RenderChat", SERVER)
    assert preprocess.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert _one(spans, "/sluice.v1.Cache/Lookup", SERVER).attributes["sluice.cache.hit"] is False
    assert _one(spans, "/sluice.v1.Cache/Store", SERVER).attributes["sluice.cache.stored"] is True

    generate = _one(spans, "/sluice.v1.Inference/Generate", SERVER)
    phases = [_one(spans, f"inference.{p}") for p in ("queue", "prefill", "decode")]
    assert all(p.parent_span_id == generate.span_id for p in phases)
    assert phases[1].attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert phases[2].attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens == 8
    assert phases[2].attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert phases[0].start_ns <= phases[1].start_ns <= phases[2].start_ns <= phases[2].end_ns

    # Every line every service wrote is one JSON object; the lines written for this request
    # (the edge's access line, inference's generation line) carry its request id and trace id.
    for service in ("edge", "preprocess", "cache", "inference"):
        lines = [json.loads(line) for line in (mesh.log_dir / f"{service}.log").read_text().splitlines()]
        assert all({"time", "level", "service", "message", "request_id", "trace_id"} <= set(line) for line in lines)
        mine = [line for line in lines if line["request_id"] == f"req-{trace_id[:8]}"]
        if service in ("edge", "inference"):
            assert mine, f"no {service} log line for the request"
        assert {line["trace_id"] for line in mine} <= {trace_id}


def test_spans_still_buffered_at_shutdown_are_exported(tmp_path: Path, certs_dir: Path, model_dir: Path) -> None:
    with OtlpReceiver() as receiver:
        # Batches far apart: whatever arrives was flushed by the services on their way out.
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "600000"}
        mesh = start_mesh(tmp_path, certs_dir, model_dir, env=env)
        try:
            client = openai.OpenAI(base_url=mesh.base_url, api_key="unused", max_retries=0)
            for i in range(2):
                client.chat.completions.create(
                    model=mesh.model_dir.name, messages=[{"role": "user", "content": f"flush {i}"}], max_tokens=4
                )
            assert receiver.spans() == []
        finally:
            assert mesh.stop() == 0
        spans = receiver.spans()
    edge_requests = [s for s in spans if s.service == "sluice-edge" and s.kind == SERVER]
    assert len(edge_requests) == 2
    assert {s.service for s in spans} == SERVICES - {"sluice-cache"}  # temperature 1: nothing cached
