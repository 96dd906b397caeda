"""Every service's /metrics moves by exactly what a handful of requests did."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import openai
import pytest
from meshproc import REPO_ROOT, Mesh

SERVICES = ("edge", "preprocess", "cache", "inference")
METRIC = re.compile(r"\bsluice_[a-z_]+")
TOKENS = 5


def test_counters_move_by_the_right_amounts(mesh: Mesh) -> None:
    model = mesh.model_dir.name
    client = openai.OpenAI(base_url=mesh.base_url, api_key="unused", max_retries=0)
    tag = uuid.uuid4().hex
    chat = {"model": model, "max_tokens": TOKENS, "temperature": 0, "extra_body": {"ignore_eos": True}}
    before = {service: mesh.scrape(service) for service in SERVICES}

    usages = [
        client.chat.completions.create(messages=[{"role": "user", "content": f"{tag} {i}"}], **chat).usage
        for i in range(3)
    ]
    stream = client.chat.completions.create(
        messages=[{"role": "user", "content": f"{tag} streamed"}],
        stream=True,
        stream_options={"include_usage": True},
        **chat,
    )
    usages.append(next(chunk.usage for chunk in stream if chunk.usage))
    client.chat.completions.create(messages=[{"role": "user", "content": f"{tag} 0"}], **chat)  # a cache hit
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(messages=[{"role": "user", "content": tag}], **chat | {"model": "no-such"})

    after = {service: mesh.scrape(service) for service in SERVICES}

    def moved(where: str, name: str, /, **labels: str) -> float:
        return after[where].value(name, **labels) - before[where].value(name, **labels)

    route = "/v1/chat/completions"
    assert moved("edge", "sluice_edge_requests_total", route=route, model=model, status="200") == 5
    assert moved("edge", "sluice_edge_requests_total", route=route, model="", status="404") == 1
    assert moved("edge", "sluice_edge_request_duration_seconds_count", route=route, model=model, status="200") == 5
    assert moved("edge", "sluice_edge_time_to_first_token_seconds_count", model=model) == 5
    assert moved("edge", "sluice_edge_cache_total", result="miss") == 4
    assert moved("edge", "sluice_edge_cache_total", result="hit") == 1
    # The edge knows which models its inference instances serve: an unknown one costs no upstream call.
    assert moved("edge", "sluice_edge_upstream_errors_total", service="preprocess", code="NOT_FOUND") == 0

    render = "/sluice.v1.Preprocess/RenderChat"
    assert moved("preprocess", "sluice_grpc_server_handled_total", method=render, code="OK") == 5
    assert moved("preprocess", "sluice_grpc_server_handled_total", method=render, code="NOT_FOUND") == 0
    assert moved("preprocess", "sluice_grpc_server_handling_seconds_count", method=render) == 5

    lookup, store = "/sluice.v1.Cache/Lookup", "/sluice.v1.Cache/Store"
    assert moved("cache", "sluice_grpc_server_handled_total", method=lookup, code="NOT_FOUND") == 4
    assert moved("cache", "sluice_grpc_server_handled_total", method=lookup, code="OK") == 1
    assert moved("cache", "sluice_grpc_server_handled_total", method=store, code="OK") == 4
    assert moved("cache", "sluice_cache_lookups_total", result="miss") == 4
    assert moved("cache", "sluice_cache_lookups_total", result="hit") == 1
    assert moved("cache", "sluice_cache_stores_total") == 4
    assert moved("cache", "sluice_cache_entries") == 4
    assert moved("cache", "sluice_cache_bytes") > 0

    generate = "/sluice.v1.Inference/Generate"
    assert moved("inference", "sluice_grpc_server_handled_total", method=generate, code="OK") == 4
    assert moved("inference", "sluice_inference_generated_tokens_total") == 4 * TOKENS
    assert moved("inference", "sluice_inference_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert moved("inference", "sluice_inference_sequences_finished_total", reason="length") == 4
    assert moved("inference", "sluice_inference_time_to_first_token_seconds_count") == 4
    assert moved("inference", "sluice_inference_inter_token_seconds_count") == 4 * (TOKENS - 1)
    # One request at a time: each took one prefill step and TOKENS - 1 decode steps of one sequence.
    assert moved("inference", "sluice_inference_batch_sequences_count") == 4 * TOKENS
    assert moved("inference", "sluice_inference_batch_sequences_sum") == 4 * TOKENS
    assert after["inference"].value("sluice_inference_running_sequences") == 0
    assert after["inference"].value("sluice_inference_queue_depth") == 0
    assert [u.completion_tokens for u in usages] == [TOKENS] * 4


DASHBOARD = REPO_ROOT / "deploy" / "kubernetes" / "components" / "grafana-dashboard" / "sluice-dashboard.json"


def test_every_metric_the_dashboard_queries_is_exported(mesh: Mesh) -> None:
    """Grafana's panels chart what a live mesh's /metrics serves (after some traffic, so every
    histogram has its buckets); a renamed metric would leave a panel silently empty."""
    client = openai.OpenAI(base_url=mesh.base_url, api_key="unused", max_retries=0)
    client.chat.completions.create(
        model=mesh.model_dir.name, messages=[{"role": "user", "content": uuid.uuid4().hex}], max_tokens=3
    )
    exported: set[str] = set()
    for service in SERVICES:
        text = httpx.get(f"http://{mesh.services[service]['metrics']}/metrics", timeout=5).text
        exported |= {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
        exported |= {line.split("{")[0].split()[0] for line in text.splitlines() if line and line[0] != "#"}
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for panel in dashboard["panels"] for t in panel["targets"] for name in METRIC.findall(t["expr"])}
    assert len(queried) >= 12  # the regex found the queries: the check below is not vacuous
    assert sorted(queried - exported) == []
