from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from meshproc import REPO_ROOT, Mesh, start_mesh, wait_for

from services.inference.default_model import build_default_model
from services.mesh.rpc.certs import init_certs


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model, built once per test session the way `sluice model init` builds it."""
    return build_default_model(tmp_path_factory.mktemp("models") / "sluice-tiny")


@pytest.fixture(scope="session")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("certs")
    init_certs(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path, model_dir: Path) -> Iterator[Mesh]:
    """The whole mesh as real processes over mTLS, started by the real `sluice up`."""
    with start_mesh(tmp_path_factory.mktemp("mesh"), certs_dir, model_dir) as running:
        yield running


# The chat model's aliases on the mesh that also serves the embedding model (test_models.py).
ALIASES = "deepseek-chat=sluice-tiny,text-embedding-3-small=all-minilm-l6-v2"


@pytest.fixture(scope="session")
def embedding_mesh(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path, model_dir: Path) -> Iterator[Mesh]:
    """A mesh that also serves the real embedding model (and aliases for both), shared by the
    modules that need one: starting a mesh is the slowest part of an end-to-end test."""
    work = tmp_path_factory.mktemp("embedding-mesh")
    with start_mesh(work, certs_dir, model_dir, "--embedding-model", "auto", "--model-aliases", ALIASES) as running:
        yield running


@pytest.fixture(scope="session")
def mesh_of_two(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path, model_dir: Path) -> Iterator[Mesh]:
    """A mesh with two inference replicas, shared by the modules that kill one and wait for it."""
    with start_mesh(tmp_path_factory.mktemp("two-replicas"), certs_dir, model_dir, "--replicas", "inference=2") as mesh:
        yield mesh


@pytest.fixture
def replicated(mesh_of_two: Mesh) -> Mesh:
    """The two-replica mesh with both replicas serving as the edge sees them, and running as
    `sluice up` sees them (the state file then holds their pids): a replica an earlier test
    killed is back first."""

    def all_serving() -> bool:
        running = all(child["state"] == "running" for child in mesh_of_two.state()["services"].values())
        reply = mesh_of_two.health()
        return running and reply.status_code == 200 and reply.json()["status"] == "ok"

    assert wait_for(all_serving, timeout=120), mesh_of_two.logs()
    return mesh_of_two


# vLLM's CPU build, which `make test` installs in a virtualenv of its own.
VLLM_PROGRAM = REPO_ROOT / ".venv-vllm" / "bin" / "vllm"


@pytest.fixture(scope="session")
def vllm_mesh(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path, model_dir: Path) -> Iterator[Mesh]:
    """The mesh with a real vLLM worker as the chat model's engine (`sluice up --engine vllm`
    starts and supervises it), in float32 as the built-in engine's reference tests run."""
    assert VLLM_PROGRAM.exists(), f"{VLLM_PROGRAM} is missing: `make test` builds vLLM's CPU build there"
    work = tmp_path_factory.mktemp("vllm-mesh")
    flags = ["--engine", "vllm", "--dtype", "float32", "--vllm-command", str(VLLM_PROGRAM)]
    with start_mesh(work, certs_dir, model_dir, *flags, timeout=900) as running:
        yield running


@pytest.fixture(scope="module", params=["builtin", "vllm"])
def served(request: pytest.FixtureRequest) -> Mesh:
    """The mesh with each engine in turn: the same client-facing tests run against both."""
    return request.getfixturevalue("mesh" if request.param == "builtin" else "vllm_mesh")
