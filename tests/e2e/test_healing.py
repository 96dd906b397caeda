"""`sluice up` heals: kill -9 of any backend is followed by a restart on the same address, and
meanwhile requests are answered as the design says (the cache down: misses; preprocess or a
model's last instance down: 503 with Retry-After, never a hang), with /health telling the truth."""

from __future__ import annotations

import json
import os
import signal
import uuid

import httpx
import pytest
from meshproc import Mesh, wait_for

MODEL = "sluice-tiny"
EMBEDDING_MODEL = "all-minilm-l6-v2"
RESTART_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def healing(embedding_mesh: Mesh) -> Mesh:
    # With the embedding model too: its instance must never count as a replica of the chat model.
    return embedding_mesh


def _chat(mesh: Mesh, content: str, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}
    return httpx.post(f"{mesh.base_url}/chat/completions", json=body, timeout=30)


def _kill(mesh: Mesh, child: str) -> int:
    """kill -9 one child of `sluice up`; returns its pid."""
    pid = mesh.child(child)["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def _restarted(mesh: Mesh, child: str, old_pid: int, restarts: int) -> bool:
    state = mesh.child(child)
    return state["pid"] != old_pid and state["state"] == "running" and state["restarts"] == restarts


def _healthy(mesh: Mesh) -> bool:
    reply = mesh.health()
    return reply.status_code == 200 and reply.json()["status"] == "ok"


def test_the_cache_killed_means_misses_until_it_is_back(healing: Mesh) -> None:
    address = healing.child("cache")["address"]
    old = _kill(healing, "cache")
    for i in range(10):
        reply = _chat(healing, f"while the cache is down {i}", temperature=0)
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-sluice-cache"] == "miss"
    assert wait_for(lambda: _restarted(healing, "cache", old, 1), timeout=RESTART_TIMEOUT_S), healing.logs()
    assert healing.child("cache")["address"] == address
    assert wait_for(lambda: _healthy(healing), timeout=30)
    prompt = f"after the cache came back {uuid.uuid4()}"
    assert _chat(healing, prompt, temperature=0).headers["x-sluice-cache"] == "miss"
    assert _chat(healing, prompt, temperature=0).headers["x-sluice-cache"] == "hit"
    assert healing.process.poll() is None


def test_the_chat_models_last_instance_killed_is_503_then_heals(healing: Mesh) -> None:
    old = _kill(healing, "inference")
    assert wait_for(lambda: healing.health().status_code == 503, timeout=10)
    report = healing.health().json()
    assert report["status"] == "unavailable"
    assert report["models"][MODEL]["serving"] == 0 and report["models"][EMBEDDING_MODEL]["serving"] == 1
    refused = _chat(healing, "while inference is down")
    if refused.status_code != 200:  # unless the restart already won the race
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["message"] == "inference is unavailable; retry shortly"
    embedded = httpx.post(f"{healing.base_url}/embeddings", json={"model": EMBEDDING_MODEL, "input": "x"}, timeout=30)
    assert embedded.status_code == 200  # the other model's instance serves on
    assert wait_for(lambda: _restarted(healing, "inference", old, 1), timeout=RESTART_TIMEOUT_S), healing.logs()
    assert wait_for(lambda: _healthy(healing), timeout=30)
    assert _chat(healing, "after inference came back").status_code == 200


def test_preprocess_killed_is_503_then_heals(healing: Mesh) -> None:
    old = _kill(healing, "preprocess")
    refused = _chat(healing, "while preprocess is down")
    if refused.status_code != 200:
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"] == {
            "message": "preprocess is unavailable; retry shortly",
            "type": "service_unavailable",
            "param": None,
            "code": "unavailable",
        }
    assert wait_for(lambda: _restarted(healing, "preprocess", old, 1), timeout=RESTART_TIMEOUT_S), healing.logs()
    assert wait_for(lambda: _healthy(healing), timeout=30)
    assert _chat(healing, "after preprocess came back").status_code == 200


def test_a_stream_cut_by_a_dying_instance_ends_with_an_error_event_and_the_mesh_heals(healing: Mesh) -> None:
    restarts = healing.child("inference")["restarts"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500, "ignore_eos": True}
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{healing.base_url}/chat/completions", json={**body, "stream": True}) as reply,
    ):
        assert reply.status_code == 200
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
        old = _kill(healing, "inference")
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))
    assert "choices" not in error
    # What the client reads says what happened, not grpc's transport text.
    assert error["error"] == {
        "message": "inference is unavailable; retry shortly",
        "type": "service_unavailable",
        "param": None,
        "code": "unavailable",
    }
    assert wait_for(lambda: _restarted(healing, "inference", old, restarts + 1), timeout=RESTART_TIMEOUT_S)
    assert wait_for(lambda: _healthy(healing), timeout=30)
    assert _chat(healing, "after the stream was cut").status_code == 200
    supervisor = httpx.get(f"http://{healing.state()['supervisor']['metrics']}/metrics", timeout=5).text
    assert f'sluice_supervisor_restarts_total{{child="inference"}} {restarts + 1}.0' in supervisor
