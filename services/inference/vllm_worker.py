"""The vLLM worker `sluice up` starts beside an inference instance whose engine is vllm: `vllm serve
MODEL --grpc` on a free port of 127.0.0.1 (plaintext: it is reached from this machine only; the
mesh's mTLS stays between Sluice's services), supervised like every child, and waited for until
its health check passes.

On a CPU it runs vLLM's CPU build as its documentation runs it: eager, its OpenMP threads
unbound, its KV cache sized from `kv_cache_bytes`. The model's number format is the one the
built-in engine would choose (`dtype`), so the two engines run the same arithmetic.
"""

from __future__ import annotations

import math
import shlex
import shutil
import socket
import time
from pathlib import Path

import grpc
from smg_grpc_proto.generated import vllm_engine_pb2, vllm_engine_pb2_grpc

from services.mesh.config import Settings
from services.mesh.contracts.model_dir import context_length
from services.mesh.lifecycle.ready import ReadyInfo
from services.mesh.lifecycle.signals import StopSignals
from services.mesh.lifecycle.supervisor import ChildFailed, ChildSpec, Supervisor

# Where `make test` builds vLLM's CPU build (its own virtualenv: it pins another transformers).
LOCAL_VENV = Path(".venv-vllm")


def vllm_program(settings: Settings) -> str:
    if settings.vllm_command:
        return settings.vllm_command
    local = LOCAL_VENV / "bin" / "vllm"
    if local.exists():
        return str(local.resolve())
    found = shutil.which("vllm")
    if found is None:
        raise FileNotFoundError(
            "engine vllm: no vLLM to start (set vllm_command, install vLLM, or give vllm_addr of a running worker)"
        )
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_argv(settings: Settings, port: int, on_cpu: bool, dtype: str) -> tuple[str, ...]:
    argv = [
        vllm_program(settings),
        "serve",
        str(settings.model.resolve()),
        "--grpc",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        settings.model_name,
        "--dtype",
        dtype,
        "--max-model-len",
        str(context_length(settings.model)),
    ]
    if on_cpu:
        argv.append("--enforce-eager")
    return (*argv, *shlex.split(settings.vllm_args))


def worker_env(settings: Settings, on_cpu: bool) -> dict[str, str]:
    if not on_cpu:
        return {}
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(settings.kv_cache_bytes / 2**30))),  # GiB
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # it shares the cores with the mesh
    }


def start_worker(
    settings: Settings, supervisor: Supervisor, name: str, env: dict[str, str], timeout: float, stop: StopSignals
) -> str:
    """Start a worker named `name` under the supervisor; its gRPC address once it is healthy."""
    from services.inference.loader import pick_device, pick_dtype  # torch: only when vLLM serves

    device = pick_device(settings.device)
    dtype = str(pick_dtype(settings.dtype, device)).removeprefix("torch.")
    port = _free_port()  # pinned in its arguments: a restart comes back where the instance dials
    on_cpu = device.type == "cpu"
    spec = ChildSpec(name, worker_argv(settings, port, on_cpu, dtype), env | worker_env(settings, on_cpu), None)
    child = supervisor.start(spec)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = vllm_engine_pb2_grpc.VllmEngineStub(channel)
        while time.monotonic() < deadline and stop.received is None:
            if child.process.poll() is not None:
                raise ChildFailed(f"{name} exited with code {child.process.returncode}\n{child.log_tail()}")
            try:
                if stub.HealthCheck(vllm_engine_pb2.HealthCheckRequest(), timeout=2.0).healthy:
                    supervisor.mark_ready(child, ReadyInfo(name, address, address, child.process.pid))
                    return address
            except grpc.RpcError:
                pass
            stop.wait(0.5)
    raise ChildFailed(f"{name} was not healthy after {timeout:.0f}s\n{child.log_tail()}")
