"""A request's settings are decided once, where it enters, and the cache key is made from that
final plan: two edges with different limits in front of one cache never serve each other's
answers."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
from meshproc import Mesh, start_edge


def test_edges_with_different_max_tokens_limits_never_share_an_answer(mesh: Mesh, tmp_path: Path) -> None:
    edges = {limit: start_edge(mesh, tmp_path, "--no-auth", "--max-tokens-limit", str(limit)) for limit in (8, 16)}
    try:
        # max_tokens unset: each edge's limit decides the completion's length.
        messages = [{"role": "user", "content": f"one plan {uuid.uuid4()}"}]
        body = {"model": "sluice-tiny", "messages": messages, "temperature": 0, "ignore_eos": True}

        def ask(limit: int) -> tuple[str, int]:
            reply = httpx.post(f"{edges[limit].base_url}/chat/completions", json=body, timeout=60)
            return reply.headers["x-sluice-cache"], reply.json()["usage"]["completion_tokens"]

        assert ask(8) == ("miss", 8)
        assert ask(16) == ("miss", 16)  # not the 8-token answer the other edge cached
        assert ask(8) == ("hit", 8)
        assert ask(16) == ("hit", 16)
    finally:
        for edge in edges.values():
            edge.stop()
