"""Schemathesis against the edge's own /openapi.json on the real running mesh (auth on, a
valid key): every generated request gets an answer below 500 and no process dies."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from meshproc import start_mesh

from services.edge_http.core import keys

# Examples per operation; the run also adds schemathesis's coverage cases (~500 in all).
# `make fuzz` runs a larger one.
EXAMPLES = os.environ.get("SLUICE_FUZZ_EXAMPLES", "30")


def test_fuzzing_the_openapi_document_finds_no_server_error(tmp_path: Path, certs_dir: Path, model_dir: Path) -> None:
    key, _ = keys.create(tmp_path / "keys.json", "fuzz")
    mesh = start_mesh(tmp_path, certs_dir, model_dir, "--auth", "--max-tokens-limit", "8")
    try:
        schema_url = mesh.base_url.removesuffix("/v1") + "/openapi.json"
        schemathesis = str(Path(sys.executable).with_name("schemathesis"))
        examples = ["--max-examples", EXAMPLES, "--seed", "1", "--request-timeout", "60"]
        auth = ["--header", f"Authorization: Bearer {key}"]
        argv = [schemathesis, "run", schema_url, "--checks", "not_a_server_error", *examples, *auth]
        # Run in tmp_path: schemathesis's crash cache stays out of the repo.
        run = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        print(run.stdout[-1500:])
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        counts = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
        assert counts, run.stdout[-3000:]
        generated, passed = map(int, counts.groups())
        assert generated >= 200 and passed == generated
        # Every service is still the process `sluice up` started.
        assert mesh.process.poll() is None
        for name, info in mesh.services.items():
            assert Path(f"/proc/{info['pid']}").exists(), f"{name} died during fuzzing"
    finally:
        mesh.stop()
