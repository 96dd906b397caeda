"""Two cache replicas sharing one real Redis behind the real mesh."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
from meshproc import start_mesh
from redisproc import redis_server


def test_cache_replicas_share_hits_and_survive_redis_going_away(
    tmp_path: Path, certs_dir: Path, model_dir: Path
) -> None:
    body = {
        "model": model_dir.name,
        "max_tokens": 6,
        "temperature": 0,
        "messages": [{"role": "user", "content": f"shared {uuid.uuid4().hex}"}],
    }
    with redis_server(tmp_path) as url:
        mesh = start_mesh(
            tmp_path, certs_dir, model_dir, "--replicas", "cache=2", "--cache-backend", "redis", "--redis-url", url
        )
        try:
            with httpx.Client(base_url=mesh.base_url, timeout=30) as http:
                replies = [http.post("/chat/completions", json=body) for _ in range(4)]
            assert [r.headers["x-sluice-cache"] for r in replies] == ["miss", "hit", "hit", "hit"]
            assert len({r.json()["choices"][0]["message"]["content"] for r in replies}) == 1
            stores = {name: mesh.metric(name, "sluice_cache_stores_total") for name in ("cache", "cache-2")}
            hits = {
                name: mesh.metric(name, "sluice_cache_lookups_total", result="hit") for name in ("cache", "cache-2")
            }
            assert sorted(stores.values()) == [0, 1] and sum(hits.values()) == 3
            never_stored = next(name for name, count in stores.items() if count == 0)
            assert hits[never_stored] >= 1  # a hit on the replica that never stored it: shared
        except BaseException:
            mesh.stop()
            raise
    try:
        # Redis is gone now: requests still succeed, as cache misses.
        with httpx.Client(base_url=mesh.base_url, timeout=30) as http:
            replies = [http.post("/chat/completions", json=body) for _ in range(2)]
        assert [(r.status_code, r.headers["x-sluice-cache"]) for r in replies] == [(200, "miss")] * 2
        logs = (mesh.log_dir / "cache.log").read_text() + (mesh.log_dir / "cache-2.log").read_text()
        assert "unreachable" in logs and "answering cache misses" in logs
    finally:
        mesh.stop()
