"""Real Envoy in front of the real mesh: the openai SDK over TLS, unbuffered SSE, and an edge
that dies behind Envoy (503 at once, recovery when it returns)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from meshproc import REPO_ROOT, Mesh, start_mesh, wait_for

from services.ingress.envoy_runner import envoy_argv
from services.mesh.config import Settings
from services.mesh.lifecycle.ready import read_ready
from services.mesh.rpc.certs import ca_paths
from services.mesh.rpc.tls import channel_credentials
from services.mesh.stubs import inference_pb2, inference_pb2_grpc


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tls(certs_dir: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_paths(certs_dir).cert))


@pytest.fixture(scope="module")
def fronted(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path, model_dir: Path) -> Iterator[Mesh]:
    """`sluice up --with-envoy`: the mesh with Envoy terminating TLS in front of the edge."""
    work = tmp_path_factory.mktemp("envoy-mesh")
    mesh = start_mesh(work, certs_dir, model_dir, "--with-envoy", "--envoy-port", "0")
    try:
        yield mesh
    finally:
        mesh.stop()


def _client(mesh: Mesh) -> openai.OpenAI:
    state = json.loads((mesh.log_dir.parent / "state.json").read_text())
    assert state["envoy_url"].startswith("https://")
    http_client = openai.DefaultHttpxClient(verify=_tls(mesh.certs_dir))
    return openai.OpenAI(base_url=state["envoy_url"], api_key="unused", max_retries=0, http_client=http_client)


def test_openai_sdk_through_envoy_over_tls(fronted: Mesh) -> None:
    client = _client(fronted)
    chat = {
        "model": fronted.model_dir.name,
        "messages": [{"role": "user", "content": "through envoy"}],
        "max_tokens": 12,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
        "extra_headers": {"Cache-Control": "no-cache"},
    }
    whole = client.chat.completions.create(**chat)
    assert whole.usage.completion_tokens == 12
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **chat))
    assert streamed == whole.choices[0].message.content
    assert [m.id for m in client.models.list()] == [fronted.model_dir.name]


def test_sse_chunks_pass_envoy_before_generation_ends(fronted: Mesh) -> None:
    client = _client(fronted)
    raw = client.chat.completions.with_raw_response.create(
        model=fronted.model_dir.name,
        messages=[{"role": "user", "content": "a long answer"}],
        max_tokens=300,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
        extra_headers={"Cache-Control": "no-cache"},
    )
    first_content = None
    for chunk in raw.parse():
        if first_content is None and chunk.choices and chunk.choices[0].delta.content:
            first_content = time.time()
    request_id = raw.headers["x-request-id"]
    # When inference finished the stream, by its own log line for this request.
    lines = [json.loads(line) for line in (fronted.log_dir / "inference.log").read_text().splitlines()]
    done = next(line for line in lines if line["request_id"] == request_id and line["message"].startswith("generated"))
    assert done["tokens"] == 300
    last_token = datetime.fromisoformat(done["time"]).timestamp()
    assert first_content is not None and first_content < last_token


def test_envoy_limits_answer_in_openai_shape(fronted: Mesh) -> None:
    state = json.loads((fronted.log_dir.parent / "state.json").read_text())
    with httpx.Client(verify=_tls(fronted.certs_dir), timeout=10) as http:
        too_big = http.post(
            f"{state['envoy_url']}/chat/completions",
            content=b"{" + b" " * (2 << 20) + b"}",
            headers={"Content-Type": "application/json"},
        )
    assert too_big.status_code == 413
    assert too_big.json()["error"]["type"] == "invalid_request_error"


class EdgeBehindEnvoy:
    """One more edge, run by hand on a fixed port (so it can be killed and brought back), and a
    real Envoy in front of it with a config from `sluice envoy-config`."""

    def __init__(self, mesh: Mesh, work: Path, *envoy_flags: str) -> None:
        self.work = work
        serve = [sys.executable, "-m", "services.cli", "serve", "edge", "--edge-port", str(_free_port())]
        files = ["--certs-dir", str(mesh.certs_dir), "--ready-file", str(work / "edge.ready")]
        upstreams = [f"--{svc}-addr={mesh.address(svc)}" for svc in ("preprocess", "inference", "cache")]
        self.edge_argv = [*serve, *files, "--no-auth", *upstreams]
        self.envoy_flags = envoy_flags
        self.certs_dir = mesh.certs_dir
        self.edge: subprocess.Popen | None = None
        self.envoy: subprocess.Popen | None = None
        self.url = ""

    def start_edge(self) -> None:
        self.edge = _start(self.edge_argv, self.work / "edge.log")

    def __enter__(self) -> EdgeBehindEnvoy:
        self.start_edge()
        ready = self.work / "edge.ready"
        assert wait_for(lambda: read_ready(ready) is not None, timeout=60), (self.work / "edge.log").read_text()
        port = _free_port()
        config = self.work / "envoy.yaml"
        envoy_config = [sys.executable, "-m", "services.cli", "envoy-config", "--certs-dir", str(self.certs_dir)]
        addresses = ["--edge-addr", read_ready(ready).address, "--envoy-port", str(port)]
        argv = [*envoy_config, *addresses, "--out", str(config), *self.envoy_flags]
        subprocess.run(argv, cwd=REPO_ROOT, check=True, timeout=120)
        self.envoy = _start(envoy_argv(config, self.work / "admin.txt", "warning"), self.work / "envoy.log")
        self.url = f"https://127.0.0.1:{port}"
        return self

    def __exit__(self, *_: object) -> None:
        for process in (self.edge, self.envoy):
            if process is not None:
                _kill(process)

    def client(self) -> httpx.Client:
        return httpx.Client(verify=_tls(self.certs_dir), timeout=5)

    def wait_serving(self, http: httpx.Client) -> None:
        def healthy() -> bool:
            try:
                return http.get(f"{self.url}/health").status_code == 200
            except httpx.TransportError:
                return False

        assert wait_for(healthy, timeout=60), (self.work / "envoy.log").read_text()[-3000:]


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        argv, cwd=REPO_ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_edge_death_behind_envoy_is_a_fast_503_and_recovery_follows(fronted: Mesh, tmp_path: Path) -> None:
    with EdgeBehindEnvoy(fronted, tmp_path) as ingress, ingress.client() as http:
        ingress.wait_serving(http)
        assert ingress.edge is not None
        _kill(ingress.edge)
        # Within the client's 5 s timeout: Envoy answers at once instead of hanging.
        down = http.get(f"{ingress.url}/v1/models")
        assert down.status_code == 503
        assert down.headers["retry-after"] == "1"
        assert down.json()["error"]["type"] == "service_unavailable"

        ingress.start_edge()
        assert wait_for(lambda: http.get(f"{ingress.url}/v1/models").status_code == 200, timeout=60)


def test_requests_above_the_rate_limit_get_429(fronted: Mesh, tmp_path: Path) -> None:
    with EdgeBehindEnvoy(fronted, tmp_path, "--envoy-rate-limit-rps", "1") as ingress, ingress.client() as http:
        ingress.wait_serving(http)
        # A bucket of 2 tokens refilled at 1/s: a quick burst of 6 runs dry.
        replies = [http.get(f"{ingress.url}/v1/models") for _ in range(6)]
        limited = [r for r in replies if r.status_code == 429]
        assert limited, [r.status_code for r in replies]
        assert limited[0].json()["error"]["type"] == "rate_limit_error"
        assert limited[0].headers["retry-after"] == "1"


def test_internal_grpc_listener_forwards_the_edge_and_refuses_other_identities(fronted: Mesh, tmp_path: Path) -> None:
    grpc_port, config = _free_port(), tmp_path / "envoy.yaml"
    envoy_config = [sys.executable, "-m", "services.cli", "envoy-config", "--certs-dir", str(fronted.certs_dir)]
    ports = ["--envoy-port", str(_free_port()), "--envoy-grpc-port", str(grpc_port)]
    upstreams = [f"--{svc}-addr={fronted.address(svc)}" for svc in ("preprocess", "inference", "cache")]
    argv = [*envoy_config, *ports, "--internal-grpc", "--out", str(config), *upstreams]
    subprocess.run(argv, cwd=REPO_ROOT, check=True, timeout=120)
    envoy = _start(envoy_argv(config, tmp_path / "admin.txt", "warning"), tmp_path / "envoy.log")
    try:
        settings = Settings(certs_dir=fronted.certs_dir)

        def list_models(identity: str) -> inference_pb2.ListModelsReply:
            with grpc.secure_channel(f"localhost:{grpc_port}", channel_credentials(settings, identity)) as channel:
                return inference_pb2_grpc.InferenceStub(channel).ListModels(
                    inference_pb2.ListModelsRequest(), timeout=5
                )

        def reachable() -> bool:
            try:
                return bool(list_models("edge").models)
            except grpc.RpcError:
                return False

        # mTLS both ways: the edge's certificate in, Envoy's own to the inference service.
        assert wait_for(reachable, timeout=60), (tmp_path / "envoy.log").read_text()[-3000:]
        assert [m.id for m in list_models("edge").models] == [fronted.model_dir.name]
        with pytest.raises(grpc.RpcError) as refused:
            list_models("preprocess")  # a mesh certificate, but not an identity allowed to call in
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        _kill(envoy)
