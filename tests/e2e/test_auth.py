"""API keys and limits at the edge, on the real mesh, driven by the `openai` SDK and httpx:
401 without a valid key, model restrictions, requests and tokens per minute (429 with
Retry-After), global size limits, keys added and revoked while running, the audit line, and
limits shared by two edges through Redis."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from meshproc import REPO_ROOT, Mesh, start_edge, start_mesh
from redisproc import redis_server

from services.edge_http.core import keys
from services.entry_urls import entry_urls, interface_addresses

MODEL = "sluice-tiny"
UPSTREAMS = ("preprocess", "inference", "cache")


def _chat(max_tokens: int = 2, **extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **extra}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path, model_dir: Path) -> Iterator[tuple[Mesh, dict]]:
    work = tmp_path_factory.mktemp("secured")
    issued = {
        "open": keys.create(work / "keys.json", "open")[0],
        "rpm": keys.create(work / "keys.json", "rpm", rpm=3)[0],
        "tpm": keys.create(work / "keys.json", "tpm", tpm=100)[0],
        "other-model": keys.create(work / "keys.json", "other-model", models=["some-other-model"])[0],
    }
    limits = ["--max-tokens-limit", "64", "--max-messages", "8", "--max-request-bytes", "4096"]
    # Exposed as a team exposes it to Dify in Docker or on other machines: every interface.
    mesh = start_mesh(work, certs_dir, model_dir, "--auth", "--public-host", "0.0.0.0", *limits)
    try:
        yield mesh, issued
    finally:
        mesh.stop()


def _client(mesh: Mesh, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.base_url, api_key=key, max_retries=0)


def test_valid_key_is_served(secured: tuple[Mesh, dict]) -> None:
    mesh, issued = secured
    reply = _client(mesh, issued["open"]).chat.completions.create(**_chat())
    assert reply.usage.completion_tokens == 2


@pytest.mark.parametrize("header", [None, "Bearer sk-sluice-000000000000-nope", "Bearer not-a-sluice-key", "Basic x"])
def test_missing_or_invalid_key_is_401_with_an_openai_error(secured: tuple[Mesh, dict], header: str | None) -> None:
    mesh, _ = secured
    headers = {"Authorization": header} if header else {}
    reply = httpx.post(f"{mesh.base_url}/chat/completions", json=_chat(), headers=headers, timeout=10)
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "invalid_api_key"
    # The SDK surfaces it as its authentication error.
    with pytest.raises(openai.AuthenticationError):
        _client(mesh, "sk-sluice-000000000000-wrong").models.list()


def test_on_every_interface_the_banner_gives_each_url_and_every_one_requires_a_key(secured: tuple[Mesh, dict]) -> None:
    mesh, issued = secured
    port = int(mesh.base_url.rsplit(":", 1)[1].removesuffix("/v1"))
    edge = psutil.Process(mesh.child("edge")["pid"])
    listening = [c.laddr for c in edge.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert (("0.0.0.0", port)) in [(a.ip, a.port) for a in listening]
    # The backends stay on loopback: only the edge is public.
    assert all(mesh.address(name).startswith("127.0.0.1:") for name in UPSTREAMS)

    banner = (mesh.log_dir.parent / "up.log").read_text()
    assert f"Listening on 0.0.0.0:{port} (API key required). Base URLs:" in banner
    expected = entry_urls("0.0.0.0", port, "http", interface_addresses())
    for url in expected:
        assert re.search(rf"^ +{re.escape(url.who)} +{re.escape(url.url)}", banner, re.MULTILINE), banner
    reachable = [url.url for url in expected if "host.docker.internal" not in url.url]
    assert len(reachable) >= 1
    for base_url in reachable:
        refused = httpx.post(f"{base_url}/chat/completions", json=_chat(), timeout=10)
        assert refused.status_code == 401, base_url
        served = httpx.post(
            f"{base_url}/chat/completions", json=_chat(), headers={"Authorization": f"Bearer {issued['open']}"}
        )
        assert served.status_code == 200, base_url


def test_keys_file_holds_no_plain_key(secured: tuple[Mesh, dict]) -> None:
    mesh, issued = secured
    stored = (mesh.log_dir.parent / "keys.json").read_text()
    for plain in issued.values():
        assert plain not in stored
        # The secret is all after the key id (`sk-sluice-<id>-<secret>`); it may itself hold a "-".
        secret = plain.removeprefix(keys.PREFIX).partition("-")[2]
        assert len(secret) >= 32 and secret not in stored
    assert oct((mesh.log_dir.parent / "keys.json").stat().st_mode & 0o777) == "0o600"


def test_key_restricted_to_other_models_gets_404_and_sees_none(secured: tuple[Mesh, dict]) -> None:
    mesh, issued = secured
    client = _client(mesh, issued["other-model"])
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(**_chat())
    assert caught.value.body["code"] == "model_not_found"
    assert [m.id for m in client.models.list()] == []
    assert [m.id for m in _client(mesh, issued["open"]).models.list()] == [MODEL]


def test_over_requests_per_minute_is_429_with_retry_after(secured: tuple[Mesh, dict]) -> None:
    mesh, issued = secured
    client = _client(mesh, issued["rpm"])
    for _ in range(3):
        client.chat.completions.create(**_chat())
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**_chat())
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.body["code"] == "rate_limit_exceeded"
    assert "3 requests per minute" in caught.value.message


def test_over_tokens_per_minute_is_429_with_retry_after(secured: tuple[Mesh, dict]) -> None:
    mesh, issued = secured
    client = _client(mesh, issued["tpm"])
    # 100 tokens per minute refill 1.7 per second. The first request takes ~15 + 40; the second
    # asks ~15 + 64, which fits the budget but not what is left unless ~20 s pass in between.
    first = client.chat.completions.create(**_chat(max_tokens=40), extra_body={"ignore_eos": True})
    assert first.usage.prompt_tokens + 64 <= 100
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**_chat(max_tokens=64))
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert "100 tokens per minute" in caught.value.message
    # A request larger than the whole budget could never pass: refused at once.
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt="x " * 200, max_tokens=1)


def test_deployment_limits_on_size_messages_and_max_tokens(secured: tuple[Mesh, dict]) -> None:
    mesh, issued = secured
    auth = {"Authorization": f"Bearer {issued['open']}"}
    url = f"{mesh.base_url}/chat/completions"
    big = httpx.post(url, json=_chat(user="x" * 5000), headers=auth, timeout=10)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    many = _chat() | {"messages": [{"role": "user", "content": "m"}] * 9}
    reply = httpx.post(url, json=many, headers=auth, timeout=10)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    reply = httpx.post(url, json=_chat(max_tokens=65), headers=auth, timeout=10)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"
    # Left unset, max_tokens stops at the deployment's limit rather than at the context length.
    reply = httpx.post(url, json=_chat() | {"max_tokens": None, "ignore_eos": True}, headers=auth, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 64


def test_keys_created_and_revoked_while_running_take_effect(secured: tuple[Mesh, dict]) -> None:
    mesh, _ = secured
    keys_file = mesh.log_dir.parent / "keys.json"
    create = [sys.executable, "-m", "services.cli", "keys", "create", "--name", "late", "--keys-file", str(keys_file)]
    created = subprocess.run(create, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True)
    late = created.stdout.strip()
    assert late.startswith(keys.PREFIX) and "shown only this once" in created.stderr
    assert _client(mesh, late).chat.completions.create(**_chat()).usage.completion_tokens == 2
    keys.revoke(keys_file, "late")
    with pytest.raises(openai.AuthenticationError):
        _client(mesh, late).chat.completions.create(**_chat())


def test_audit_line_names_key_model_tokens_and_status_but_not_the_prompt(secured: tuple[Mesh, dict]) -> None:
    mesh, issued = secured
    secret_prompt = "my-confidential-prompt-4711"
    _client(mesh, issued["open"]).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": secret_prompt}], max_tokens=3
    )
    log_text = (mesh.log_dir / "edge.log").read_text()
    assert secret_prompt not in log_text
    audit = [json.loads(line) for line in log_text.splitlines() if '"sluice.audit"' in line]
    mine = [a for a in audit if a["key"] == "open" and a["path"] == "/v1/chat/completions" and a["status"] == 200]
    assert mine and mine[-1]["model"] == MODEL and mine[-1]["tokens"] > 3 and mine[-1]["duration_ms"] > 0
    assert any(a["status"] == 401 and a["key"] == "" for a in audit)


def test_two_edges_share_one_limit_through_redis(tmp_path: Path, certs_dir: Path, model_dir: Path) -> None:
    with redis_server(tmp_path) as redis_url:
        plain, _ = keys.create(tmp_path / "keys.json", "shared", rpm=4)
        redis_backend = ["--cache-backend", "redis", "--redis-url", redis_url]
        mesh = start_mesh(tmp_path, certs_dir, model_dir, "--auth", *redis_backend)
        second = None
        try:
            second = start_edge(mesh, tmp_path, "--keys-file", str(tmp_path / "keys.json"), *redis_backend)
            urls = [mesh.base_url, second.base_url]
            # Alternating edges: 4 admitted in all, not 4 per edge.
            statuses = [_client_status(urls[i % 2], plain) for i in range(6)]
            assert statuses == [200, 200, 200, 200, 429, 429]
        finally:
            if second is not None:
                second.stop()
            mesh.stop()


def _client_status(base_url: str, key: str) -> int:
    reply = httpx.post(
        f"{base_url}/chat/completions", json=_chat(), headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    return reply.status_code
