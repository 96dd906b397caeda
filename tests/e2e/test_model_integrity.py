"""The inference service checks its model directory against the SHA-256 manifest before loading:
a flipped byte or a missing manifest stops it with the file named; the explicit flag serves an
unverified directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from meshproc import REPO_ROOT, wait_for

from services.inference.manifest import MANIFEST
from services.mesh.lifecycle.ready import read_ready


def _inference(model: Path, certs_dir: Path, work: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache"), "SLUICE_LOG_FORMAT": "text"}
    serve = [sys.executable, "-m", "services.cli", "serve", "inference", "--model", str(model)]
    files = ["--certs-dir", str(certs_dir), "--ready-file", str(work / "ready.json")]
    argv = [*serve, *files, *flags]
    return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def model_copy(tmp_path: Path, model_dir: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


def test_a_flipped_byte_stops_the_service_naming_the_file(model_copy: Path, certs_dir: Path, tmp_path: Path) -> None:
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    process = _inference(model_copy, certs_dir, tmp_path)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert f"{weights} does not match its SHA-256" in output
    assert read_ready(tmp_path / "ready.json") is None


def test_a_missing_manifest_needs_the_explicit_flag(model_copy: Path, certs_dir: Path, tmp_path: Path) -> None:
    (model_copy / MANIFEST).unlink()
    refused = _inference(model_copy, certs_dir, tmp_path)
    output, _ = refused.communicate(timeout=120)
    assert refused.returncode == 1 and "sluice model manifest" in output

    allowed = _inference(model_copy, certs_dir, tmp_path, "--allow-missing-manifest")
    try:
        assert wait_for(lambda: read_ready(tmp_path / "ready.json") is not None, timeout=120)
    finally:
        allowed.send_signal(signal.SIGTERM)
        output, _ = allowed.communicate(timeout=30)
    assert "UNVERIFIED" in output
