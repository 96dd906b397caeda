"""`sluice up` end to end as an operator sees it: plaintext flag, cache off, draining on SIGTERM
or Ctrl-C, no orphans."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from meshproc import STOP_SIGNALS, assert_stops_cleanly_mid_stream, start_mesh

from services.mesh.rpc.tls import INSECURE_WARNING

DRAIN_GRACE_S = 30  # well above what the stream below needs on a loaded machine


@pytest.mark.parametrize("how", list(STOP_SIGNALS))
def test_stopping_drains_an_in_flight_stream_and_leaves_nothing_running(
    tmp_path: Path, certs_dir: Path, model_dir: Path, how: str
) -> None:
    mesh = start_mesh(
        tmp_path, certs_dir, model_dir, "--insecure", "--no-cache-enabled", "--drain-grace-s", str(DRAIN_GRACE_S)
    )
    try:
        assert INSECURE_WARNING in mesh.logs()
        messages = [{"role": "user", "content": "hi"}]
        body = {"model": "sluice-tiny", "messages": messages, "max_tokens": 8, "temperature": 0}
        whole = httpx.post(f"{mesh.base_url}/chat/completions", json=body, timeout=60)
        assert whole.headers["x-sluice-cache"] == "off"
        assert_stops_cleanly_mid_stream(mesh, how, DRAIN_GRACE_S, max_tokens=120)
    finally:
        mesh.stop()


def test_up_refuses_a_missing_model_directory(tmp_path: Path, certs_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="does not exist"):
        start_mesh(tmp_path, certs_dir, tmp_path / "no-such-model", timeout=60)
