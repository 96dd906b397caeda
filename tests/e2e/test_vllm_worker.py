"""A real vLLM worker (vLLM's CPU build) behind the mesh, started and supervised by
`sluice up --engine vllm`: the same weights give the built-in engine's greedy text, a client that
goes away has its request aborted in the worker, and a worker killed with SIGKILL is restarted
while the model's /health follows it. (The client-facing suites, test_openai_sdk.py and
test_http_contract.py, run against this mesh too.)"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import httpx
import openai
from meshproc import Mesh, wait_for
from smg_grpc_proto.generated import vllm_engine_pb2, vllm_engine_pb2_grpc

from services.inference.engine import Engine
from services.inference.engine_api import GenerationRequest, SamplingConfig
from services.inference.loader import load_model

MODEL = "sluice-tiny"
# How many greedy tokens the two engines agree on at float32. They run the same weights with
# different kernels (vLLM's CPU attention and linear layers against torch's), whose last bits
# differ; the default model's random weights put near-ties everywhere, so longer runs may part.
AGREED_TOKENS = 8


def _worker_running(mesh: Mesh) -> int:
    with grpc.insecure_channel(mesh.address("vllm")) as channel:
        loads = vllm_engine_pb2_grpc.VllmEngineStub(channel).GetLoads(vllm_engine_pb2.GetLoadsRequest(), timeout=5)
    return sum(load.num_running_reqs for load in loads.loads)


def test_greedy_output_is_the_builtin_engines_on_the_same_weights(vllm_mesh: Mesh, model_dir: Path, tokenizer) -> None:
    messages = [{"role": "user", "content": "import os\nimport sys\n"}]
    client = openai.OpenAI(base_url=vllm_mesh.base_url, api_key="unused", max_retries=0, timeout=120)
    served = client.completions.create(
        model=MODEL,
        prompt=tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        max_tokens=AGREED_TOKENS,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True},
        extra_headers={"Cache-Control": "no-cache"},
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    engine = Engine(load_model(model_dir, "cpu", dtype="float32"))
    greedy = SamplingConfig(temperature=0, ignore_eos=True)
    builtin = [t for s in engine.submit(GenerationRequest("g", ids, AGREED_TOKENS, greedy)) for t in s.token_ids]
    assert served.choices[0].text == tokenizer.decode(builtin)
    assert served.usage.completion_tokens == AGREED_TOKENS


def test_a_client_that_leaves_has_its_request_aborted_in_the_worker(vllm_mesh: Mesh) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a long one"}],
        "max_tokens": 1500,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{vllm_mesh.base_url}/chat/completions", json=body) as reply,
    ):
        lines = reply.iter_lines()
        for _ in range(6):  # a few chunks: the worker is generating
            next(lines)
        assert _worker_running(vllm_mesh) == 1
    # The client closed the connection: the edge cancels its call, inference aborts the worker's request.
    assert wait_for(lambda: _worker_running(vllm_mesh) == 0, timeout=15)


def test_a_killed_worker_is_restarted_and_the_models_health_follows_it(vllm_mesh: Mesh) -> None:
    worker = vllm_mesh.child("vllm")
    os.kill(worker["pid"], signal.SIGKILL)
    assert wait_for(lambda: vllm_mesh.health().status_code == 503, timeout=30), vllm_mesh.logs()
    assert vllm_mesh.health().json()["models"][MODEL]["serving"] == 0
    restarted = lambda: vllm_mesh.child("vllm")["restarts"] >= 1 and vllm_mesh.health().status_code == 200  # noqa: E731
    assert wait_for(restarted, timeout=600), vllm_mesh.logs()
    assert vllm_mesh.child("vllm")["pid"] != worker["pid"]
    client = openai.OpenAI(base_url=vllm_mesh.base_url, api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "back?"}], max_tokens=4)
    assert answer.usage.completion_tokens >= 1
