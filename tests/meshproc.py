"""Run `sluice up` as a real process for tests, and always take it down again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REPO_ROOT = Path(__file__).resolve().parents[1]


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll an observable condition instead of sleeping a fixed time: True as soon as it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@dataclass
class Samples:
    samples: list[Sample]

    def value(self, name: str, /, **labels: str) -> float:
        """The first sample with this name and these labels (others may differ); 0 when absent."""
        for sample in self.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
        return 0.0


@dataclass
class Mesh:
    process: subprocess.Popen
    base_url: str
    services: dict[str, dict]
    certs_dir: Path
    model_dir: Path
    log_dir: Path
    state_file: Path

    def address(self, service: str) -> str:
        return self.services[service]["address"]

    def state(self) -> dict:
        """The state file as `sluice up` last wrote it (pids and restarts change as it heals)."""
        return json.loads(self.state_file.read_text())

    def child(self, name: str) -> dict:
        return self.state()["services"][name]

    def health(self) -> httpx.Response:
        return httpx.get(self.base_url.removesuffix("/v1") + "/health", timeout=10)

    def scrape(self, service: str) -> Samples:
        """Every sample on the service's /metrics, parsed with prometheus-client's parser."""
        text = httpx.get(f"http://{self.services[service]['metrics']}/metrics", timeout=5).text
        return Samples([s for family in text_string_to_metric_families(text) for s in family.samples])

    def metric(self, service: str, name: str, /, **labels: str) -> float:
        """Current value of one sample scraped from the service's /metrics (0 when absent)."""
        return self.scrape(service).value(name, **labels)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.log_dir.glob("*.log"))

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the supervisor; kill its whole process group if it does not exit in time.
        Every process the mesh started must be gone with it: what is left (an orphan) is killed
        and fails the test."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # `sluice up` leads a session of its own (start_new_session): its children and theirs share it.
        session = self.process.pid
        if not wait_for(lambda: not session_members(session), timeout=10):
            left = session_members(session)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"the mesh left processes running after it stopped: {left}")
        return self.process.returncode


def session_members(session: int) -> dict[int, str]:
    """Live processes (not zombies) of a session, pid to command name."""
    members = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        name, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        # After the name: state, ppid, pgrp, session.
        if fields[0] != "Z" and int(fields[3]) == session:
            members[int(stat.parent.name)] = name
    return members


def start_mesh(
    workdir: Path,
    certs_dir: Path,
    model_dir: Path,
    *extra: str,
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    repo: Path = REPO_ROOT,
) -> Mesh:
    """`sluice up` of the code in `repo` (a worktree of another revision, for a side-by-side benchmark)."""
    state_file = workdir / "state.json"
    log_dir = workdir / "logs"
    up = [sys.executable, "-m", "services.cli", "up", "--port", "0"]
    inputs = ["--certs-dir", str(certs_dir), "--model", str(model_dir)]
    outputs = ["--state-file", str(state_file), "--log-dir", str(log_dir)]
    # Tests of the mesh's other behaviour run without keys; test_auth.py passes --auth.
    no_auth = ["--no-auth", "--keys-file", str(workdir / "keys.json")]
    # The embedding model's instance only where a test asks for it (--embedding-model auto).
    no_embedding = ["--embedding-model", "none"]
    argv = [*up, *inputs, *outputs, "--drain-grace-s", "5", *no_auth, *no_embedding, *extra]
    process = subprocess.Popen(
        argv,
        cwd=repo,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        stdout=(workdir / "up.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    mesh = Mesh(process, "", {}, certs_dir, model_dir, log_dir, state_file)
    deadline = time.monotonic() + timeout
    while not state_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            mesh.stop()
            raise RuntimeError(f"sluice up failed to start:\n{(workdir / 'up.log').read_text()}\n{mesh.logs()}")
        time.sleep(0.1)
    state = mesh.state()
    mesh.base_url = state["base_url"]
    mesh.services = state["services"]
    return mesh


@dataclass(frozen=True)
class Outcome:
    """How one streamed chat ended, as a client under faults sees it."""

    kind: str  # completed, truncated (no error, tokens missing: must never happen), hung, error after
    # tokens (an SSE error event), failed before tokens (an HTTP error)
    reason: str = ""  # for a failure: the status and the error's message


async def streamed_outcome(
    client: openai.AsyncOpenAI, model: str, content: str, tokens: int, timeout_s: float, **extra: Any
) -> Outcome:
    """Send one greedy streaming chat of exactly `tokens` tokens and say how it ended."""
    streamed = 0
    try:
        async with asyncio.timeout(timeout_s):
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": content}],
                max_tokens=tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
                **extra,
            )
            usage = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    streamed += 1
                usage = chunk.usage or usage
    except TimeoutError:
        return Outcome("hung")
    except openai.APIError as err:
        status = err.status_code if isinstance(err, openai.APIStatusError) else "in stream"
        body = err.body if isinstance(err.body, dict) else {}
        reason = f"{status} {body.get('message', err.message)}"
        return Outcome("error after tokens" if streamed else "failed before tokens", reason)
    if usage is None or usage.completion_tokens != tokens:
        return Outcome("truncated")
    return Outcome("completed")


STOP_SIGNALS = {
    "SIGTERM to sluice up": lambda mesh: mesh.process.send_signal(signal.SIGTERM),
    # What a terminal's Ctrl-C does: every process of the group gets SIGINT at once.
    "Ctrl-C: SIGINT to the process group": lambda mesh: os.killpg(mesh.process.pid, signal.SIGINT),
}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_stops_cleanly_mid_stream(mesh: Mesh, how: str, grace_s: float, max_tokens: int) -> None:
    """Stop the mesh (`how`: a key of STOP_SIGNALS) while a stream is running: the stream must be
    drained to its end, `sluice up` exit 0 within the grace plus a small margin, nothing be left."""
    messages = [{"role": "user", "content": "hi"}]
    body = {"model": "sluice-tiny", "messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    url = f"{mesh.base_url}/chat/completions"
    with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
        pids = [info["pid"] for info in mesh.state()["services"].values()]  # `sluice up` removes the file on exit
        stopped_at = time.monotonic()
        STOP_SIGNALS[how](mesh)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in rest[:-1]]
    assert all("choices" in event for event in events), f"the drain failed the stream: {events[-1]}"
    assert events[-1]["choices"][0]["finish_reason"] == "length", "the stream was cut instead of drained"
    assert mesh.process.wait(timeout=grace_s + 10) == 0
    assert time.monotonic() - stopped_at < grace_s + 5
    assert not [pid for pid in pids if alive(pid)]
    assert not mesh.state_file.exists()


GENERATION_PROMPT = "'<|im_start|>assistant\\n' }}"  # where the default model's template opens the answer


def with_generation_prompt(model_dir: Path, workdir: Path, generation_prompt: str) -> Path:
    """A copy of the default model whose chat template opens the assistant's turn with
    `generation_prompt` (Jinja) instead, with its manifest rewritten: a stand-in for the
    templates of other model families (R1's opened `<think>`, Qwen3's thinking switch)."""
    from services.inference.manifest import write_manifest

    model = workdir / model_dir.name
    shutil.copytree(model_dir, model)
    template = model / "chat_template.jinja"
    assert template.read_text().count(GENERATION_PROMPT) == 1
    template.write_text(template.read_text().replace(GENERATION_PROMPT, generation_prompt))
    write_manifest(model)
    return model


@dataclass
class Edge:
    process: subprocess.Popen
    base_url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_edge(mesh: Mesh, workdir: Path, *flags: str, **addresses: str) -> Edge:
    """One more edge process in front of the mesh's services (or of `<service>=host:port` overrides)."""
    from services.mesh.lifecycle.ready import read_ready

    ready = workdir / f"edge-{time.monotonic_ns()}.ready"
    upstreams = {svc: addresses.get(svc, mesh.address(svc)) for svc in ("preprocess", "inference", "cache")}
    serve = [sys.executable, "-m", "services.cli", "serve", "edge", "--edge-port", "0"]
    files = ["--certs-dir", str(mesh.certs_dir), "--ready-file", str(ready)]
    upstream_addresses = [f"--{svc}-addr={address}" for svc, address in upstreams.items()]
    argv = [*serve, *files, *upstream_addresses, *flags]
    log = (workdir / f"{ready.stem}.log").open("wb")
    process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    edge = Edge(process, "")
    if not wait_for(lambda: read_ready(ready) is not None or process.poll() is not None, timeout=60) or (
        process.poll() is not None
    ):
        edge.stop()
        raise RuntimeError(f"the edge did not start:\n{(workdir / f'{ready.stem}.log').read_text()[-3000:]}")
    edge.base_url = f"http://{read_ready(ready).address}/v1"
    return edge
