"""Consul discovery: registration, checks, heartbeats, blocking watches and draining, against a
stand-in that speaks the Consul agent's HTTP API (tests/consul_standin.py), then the whole mesh
finding itself through it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from consul_standin import ConsulStandIn
from meshproc import REPO_ROOT, start_mesh, wait_for

from services.mesh.config import Settings
from services.mesh.discovery.base import Instance
from services.mesh.discovery.consul import ConsulDiscovery
from services.mesh.lifecycle.registration import ConsulRegistration


@pytest.fixture
def standin(certs_dir: Path) -> Iterator[ConsulStandIn]:
    with ConsulStandIn(certs_dir) as running:
        yield running


def _settings(standin: ConsulStandIn, certs_dir: Path) -> Settings:
    return Settings(certs_dir=certs_dir, discovery="consul", consul_addr=standin.address, consul_check_interval_s=0.2)


def test_registration_carries_both_checks_and_heartbeats_follow_the_probe(
    standin: ConsulStandIn, certs_dir: Path
) -> None:
    live = [True]
    registration = ConsulRegistration(
        _settings(standin, certs_dir), "inference", "127.0.0.1:1", lambda: live[0], ("sluice-tiny",), {"pid": "1"}
    )
    registration.register()
    body = standin.services[registration.service_id]
    registered = (body["name"], body["address"], body["port"], body["tags"], body["meta"])
    assert registered == ("sluice-inference", "127.0.0.1", 1, ["sluice-tiny"], {"pid": "1"})
    checks = {c.id: c for c in standin.checks.values()}
    grpc_check = checks[f"{registration.service_id}:grpc"]
    assert (grpc_check.grpc, grpc_check.grpc_tls) == ("127.0.0.1:1", True)
    ttl_check = checks[registration.ttl_check]
    assert ttl_check.ttl == pytest.approx(0.6)
    assert ttl_check.deregister_after == 60  # what a kill -9 leaves behind is reaped by the agent
    assert wait_for(lambda: ttl_check.status == "passing", timeout=5)
    # Nothing answers gRPC on port 1: the agent's own check keeps the instance out.
    assert wait_for(lambda: grpc_check.status == "critical", timeout=5)
    assert standin.healthy("sluice-inference", passing=True) == []

    live[0] = False  # the probe fails (a hung engine): the heartbeat reports it
    assert wait_for(lambda: ttl_check.status == "critical", timeout=5)
    assert ttl_check.output == "not making progress"
    registration.deregister()
    assert registration.service_id not in standin.services


def test_watch_pushes_changes_through_blocking_queries(standin: ConsulStandIn, certs_dir: Path) -> None:
    discovery = ConsulDiscovery(_settings(standin, certs_dir))
    seen: list[list[Instance]] = []
    discovery.watch("cache", seen.append)
    try:
        assert wait_for(lambda: seen == [[]], timeout=5)
        ttl_check = {"CheckID": "c1:ttl", "ttl": "30s"}
        standin.register({"name": "sluice-cache", "id": "c1", "address": "10.0.0.1", "port": 7, "checks": [ttl_check]})
        standin.set_status("c1:ttl", "passing")
        assert wait_for(lambda: len(seen) == 2, timeout=5)
        assert seen[-1] == [Instance("cache", "10.0.0.1:7", "c1")]
        standin.set_status("c1:ttl", "critical")
        assert wait_for(lambda: seen[-1] == [], timeout=5)
        assert standin.blocking_queries >= 2
    finally:
        discovery.close()


def test_the_mesh_finds_itself_through_consul_and_leaves_it_when_stopped(
    standin: ConsulStandIn, certs_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    consul = {
        "SLUICE_DISCOVERY": "consul",
        "SLUICE_CONSUL_ADDR": standin.address,
        "SLUICE_CONSUL_CHECK_INTERVAL_S": "0.5",
    }
    mesh = start_mesh(tmp_path, certs_dir, model_dir, "--replicas", "inference=2", env=consul)
    try:
        for service, count in (("preprocess", 1), ("cache", 1), ("inference", 2)):
            assert wait_for(lambda s=service, n=count: len(standin.healthy(f"sluice-{s}", True)) == n, timeout=30)
        # Every check passing means the stand-in's own mTLS gRPC checks reached every service.
        assert all(c.status == "passing" for c in standin.checks.values())
        inference = standin.healthy("sluice-inference", True)
        assert {tuple(e["Service"]["Tags"]) for e in inference} == {
            (f"model={model_dir.name}", "kind=chat", "engine=builtin")
        }
        with httpx.Client(base_url=mesh.base_url, timeout=30) as http:
            assert wait_for(lambda: http.get(mesh.base_url.removesuffix("/v1") + "/health").status_code == 200)
            reply = http.post(
                "/chat/completions",
                json={
                    "model": model_dir.name,
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": "via consul"}],
                },
            )
            assert reply.status_code == 200, reply.text
        # `sluice status` finds the same instances through Consul, with their metrics endpoints.
        argv = [sys.executable, "-m", "services.cli", "status", "--json", "--discovery", "consul"]
        argv += ["--consul-addr", standin.address, "--url", mesh.base_url, "--certs-dir", str(certs_dir)]
        done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        rows = status["instances"]
        assert sorted(r["service"] for r in rows) == ["cache", "edge", "inference", "inference", "preprocess"]
        assert all(r["healthy"] and r["uptime_s"] is not None for r in rows), rows
        assert [(m["model"], m["serving"]) for m in status["models"]] == [(model_dir.name, 2)]
    finally:
        assert mesh.stop() == 0
    assert standin.services == {}  # every service deregistered on the way out
