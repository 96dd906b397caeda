"""`sluice up` end to end as an operator sees it: plaintext flag, cache off, draining on SIGTERM, no orphans."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import pytest
from meshproc import start_mesh

from services.mesh.tls import INSECURE_WARNING


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_drains_in_flight_stream_and_leaves_nothing_running(
    tmp_path: Path, certs_dir: Path, model_dir: Path
) -> None:
    mesh = start_mesh(tmp_path, certs_dir, model_dir, "--insecure", "--no-cache-enabled")
    try:
        assert INSECURE_WARNING in mesh.logs()
        messages = [{"role": "user", "content": "hi"}]
        body = {"model": "sluice-tiny", "messages": messages, "max_tokens": 300, "ignore_eos": True}
        with httpx.Client(timeout=60) as client:
            assert (
                client.post(f"{mesh.base_url}/chat/completions", json={**body, "temperature": 0}).headers[
                    "x-sluice-cache"
                ]
                == "off"
            )
            with client.stream("POST", f"{mesh.base_url}/chat/completions", json={**body, "stream": True}) as reply:
                lines = reply.iter_lines()
                assert next(lines).startswith("data: ")
                mesh.process.send_signal(signal.SIGTERM)  # Ctrl-C equivalent, mid-stream
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        events = [json.loads(line[6:]) for line in rest[:-1]]
        assert all("choices" in event for event in events), f"the drain failed the stream: {events[-1]}"
        finishes = [event["choices"][0]["finish_reason"] for event in events]
        assert finishes[-1] == "length", "the stream was cut instead of drained"
        assert mesh.process.wait(timeout=60) == 0
        pids = [info["pid"] for info in mesh.services.values()]
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        mesh.stop()


def test_up_refuses_a_missing_model_directory(tmp_path: Path, certs_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="does not exist"):
        start_mesh(tmp_path, certs_dir, tmp_path / "no-such-model", timeout=60)


def test_inference_dying_mid_stream_ends_the_stream_with_an_error_event(
    tmp_path: Path, certs_dir: Path, model_dir: Path
) -> None:
    mesh = start_mesh(tmp_path, certs_dir, model_dir)
    try:
        body = {
            "model": "sluice-tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1500,
            "ignore_eos": True,
            "stream": True,
        }
        with (
            httpx.Client(timeout=60) as client,
            client.stream("POST", f"{mesh.base_url}/chat/completions", json=body) as reply,
        ):
            assert reply.status_code == 200
            lines = reply.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(mesh.services["inference"]["pid"], signal.SIGKILL)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))
        assert "choices" not in error
        assert error["error"]["message"].startswith("inference")
        assert error["error"]["type"] == "service_unavailable"
        # The supervisor notices the dead service and stops the rest.
        assert mesh.process.wait(timeout=60) == 1
    finally:
        mesh.stop()
