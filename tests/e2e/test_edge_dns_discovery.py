"""An edge with DNS discovery in front of the real mesh: it resolves each service's name through
a real DNS server on loopback (as on Kubernetes, where a headless Service resolves to its pods),
verifies each instance's certificate by that name, and serves chats with the openai SDK."""

from __future__ import annotations

from pathlib import Path

import openai
from dns_standin import dns_zone
from meshproc import Mesh, start_edge


def test_an_edge_finds_the_mesh_through_dns(mesh: Mesh, tmp_path: Path) -> None:
    with dns_zone() as zone:
        # The mesh's certificates name `localhost`; on a cluster they name the Services.
        zone.names["localhost"] = ["127.0.0.1"]
        ports = {svc: mesh.address(svc).rpartition(":")[2] for svc in ("preprocess", "inference", "cache")}
        names = {svc: f"localhost:{port}" for svc, port in ports.items()}
        edge = start_edge(mesh, tmp_path, "--discovery", "dns", "--dns-server", zone.server, "--no-auth", **names)
        try:
            client = openai.OpenAI(base_url=edge.base_url, api_key="unused", max_retries=2, timeout=60)
            reply = client.chat.completions.create(
                model="sluice-tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4
            )
            assert reply.choices[0].finish_reason in ("stop", "length")
            assert reply.usage.completion_tokens >= 1
        finally:
            edge.stop()
