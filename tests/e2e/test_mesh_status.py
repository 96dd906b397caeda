"""`sluice status` against a real mesh with two inference replicas: every service SERVING, then a
replica killed shows as down, then its restart brings it back with one restart counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from meshproc import REPO_ROOT, Mesh, start_mesh, wait_for


@pytest.fixture(scope="module")
def fresh_pair(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path, model_dir: Path) -> Iterator[Mesh]:
    """Its own two-replica mesh, not the shared one: these tests count restarts from zero."""
    with start_mesh(tmp_path_factory.mktemp("status"), certs_dir, model_dir, "--replicas", "inference=2") as mesh:
        yield mesh


def _status(mesh: Mesh, *flags: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "services.cli", "status", "--state-file", str(mesh.state_file)]
    env = {**os.environ, "COLUMNS": "160"}
    argv += ["--certs-dir", str(mesh.certs_dir), *flags]
    return subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)


def _json(mesh: Mesh) -> dict:
    done = _status(mesh, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _rows(status: dict) -> dict[str, dict]:
    return {row["name"]: row for row in status["instances"]}


def test_every_service_shows_serving_with_its_model(fresh_pair: Mesh) -> None:
    client = openai.OpenAI(base_url=fresh_pair.base_url, api_key="unused", max_retries=0)
    for _ in range(2):  # a miss, then the same request answered by the completion cache
        client.chat.completions.create(
            model="sluice-tiny", messages=[{"role": "user", "content": "status"}], max_tokens=4, temperature=0
        )
    status = _json(fresh_pair)
    rows = _rows(status)
    assert set(rows) == {"preprocess", "cache", "inference", "inference-2", "edge"}
    assert all(row["healthy"] and row["state"] == "running" and row["restarts"] == 0 for row in rows.values())
    assert all(row["uptime_s"] is not None and row["uptime_s"] >= 0 for row in rows.values())
    (model,) = status["models"]
    assert (model["model"], model["instances"], model["serving"]) == ("sluice-tiny", 2, 2)
    assert model["kv_used_share"] is not None and model["tokens_per_s"] > 0
    assert status["cache_hit_ratio"] == 0.5
    table = _status(fresh_pair)
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("SERVING") == 5 and "sluice-tiny" in table.stdout and "2/2" in table.stdout


def test_a_killed_replica_shows_down_then_back_with_its_restart(fresh_pair: Mesh) -> None:
    os.kill(fresh_pair.child("inference-2")["pid"], signal.SIGKILL)
    assert wait_for(lambda: not _rows(_json(fresh_pair))["inference-2"]["healthy"], timeout=30)
    down = _status(fresh_pair)
    assert "DOWN" in down.stdout
    assert wait_for(lambda: _rows(_json(fresh_pair))["inference-2"]["healthy"], timeout=120), "never restarted"
    row = _rows(_json(fresh_pair))["inference-2"]
    assert row["restarts"] == 1 and row["state"] == "running"
    assert _json(fresh_pair)["models"][0]["serving"] == 2


def test_without_a_running_mesh_it_says_so(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "services.cli", "status", "--state-file", str(tmp_path / "none.json")]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "is the mesh running" in done.stderr
