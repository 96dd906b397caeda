"""Throughput and latency under concurrent streaming load: Sluice against `transformers serve`,
side by side in one run.

Servers (closed loop through the official openai async client: N clients, each streaming
chats back to back; greedy; EOS ignored; every prompt unique and the completion cache told
`no-cache`): the Sluice mesh and `transformers serve --continuous-batching`, both started here
on free ports and alternated at every concurrency (A B A B A B), medians reported.

In-process, given N requests at once for every client count N (alternated the same way):
Sluice's engine (batch invariance off and on), one static padded batch through
`model.generate`, transformers' own continuous-batching manager (`generate_batch`); and
sequential `model.generate` on 4 requests. All on the torch threads the inference service
chooses for the model (measured the same way).

Memory: the inference service's peak RSS while 32 streams run with `max_tokens` unset, against
the model's weights plus the KV blocks in use.

Charts: a PNG of tokens/s and TTFT against concurrency (the mesh, the peer, the engine
in-process) beside the tables, in --charts (default benchmarks/results/).

    python benchmarks/concurrency.py [--preset default|bench] [--concurrency 1,4,16,32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import openai
import psutil
import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.configuration_utils import ContinuousBatchingConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from charts import Series, concurrency_chart
from meshproc import Mesh, start_mesh

from services.inference.default_model import PRESETS, build_default_model
from services.inference.engine import Engine
from services.inference.engine_api import GenerationRequest, SamplingConfig
from services.inference.loader import load_model, pick_dtype
from services.inference.paged_attention import kv_geometry
from services.inference.scheduler import EngineLimits
from services.mesh.rpc.certs import init_certs
from services.up import INFERENCE_ENVIRONMENT

_unique = itertools.count()


def prompt() -> str:
    """A prompt no cache and no earlier request has seen."""
    return f"Story {next(_unique)}: the river reached the sluice gate and"


@dataclass
class LoadResult:
    tokens_per_s: float
    ttft_p50: float
    itl_p50: float
    errors: int
    tokens: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds each watched process used

    def cpu_ms_per_token(self, process: str) -> float:
        return self.cpu_s.get(process, float("nan")) * 1e3 / self.tokens if self.tokens else float("nan")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def _load(base_url: str, model: str, concurrency: int, tokens: int, rounds: int, extra: dict) -> LoadResult:
    ttfts: list[float] = []
    itls: list[float] = []
    generated = errors = 0

    async def client_loop(client: openai.AsyncOpenAI) -> None:
        nonlocal generated, errors
        for _ in range(rounds):
            started = time.perf_counter()
            first = last = None
            count = 0
            try:
                stream = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": prompt()}],
                    max_tokens=tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                    **extra,
                )
                async for chunk in stream:
                    if chunk.usage:
                        count = chunk.usage.completion_tokens
                    if chunk.choices and chunk.choices[0].delta.content:
                        last = time.perf_counter()
                        first = first or last
            except openai.OpenAIError:
                errors += 1
                continue
            if first is None:
                errors += 1
                continue
            generated += count
            ttfts.append(first - started)
            if count > 1:
                itls.append((last - first) / (count - 1))

    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return LoadResult(generated / elapsed, _median(ttfts), _median(itls), errors, generated)


@dataclass
class Server:
    name: str
    base_url: str
    model: str
    extra: dict
    watched: dict[str, int] = field(default_factory=dict)  # process name → pid whose CPU time is counted

    def load(self, concurrency: int, tokens: int, rounds: int) -> LoadResult:
        processes = {name: psutil.Process(pid) for name, pid in self.watched.items()}
        processes["load generator"] = psutil.Process()
        before = {name: _cpu_s(p) for name, p in processes.items()}
        result = asyncio.run(_load(self.base_url, self.model, concurrency, tokens, rounds, self.extra))
        result.cpu_s = {name: _cpu_s(p) - before[name] for name, p in processes.items()}
        return result


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


# ---------------------------------------------------------------- in-process contenders


def _ids(tokenizer: PreTrainedTokenizerBase, n: int) -> list[list[int]]:
    chats = [[{"role": "user", "content": prompt()}] for _ in range(n)]
    return [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in chats
    ]


def static_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int, tokens: int) -> float:
    """One left-padded batch through model.generate."""
    ids = _ids(tokenizer, n)
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([[0] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return n * tokens / (time.perf_counter() - started)


def sequential(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int, tokens: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for ids in _ids(tokenizer, n):
            model.generate(
                torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
            )
    return n * tokens / (time.perf_counter() - started)


def transformers_cb(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int, tokens: int) -> float:
    """transformers' continuous-batching manager on the same requests (EOS never ends them), kept
    between calls and sized as the peer server is."""
    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=32, max_batch_tokens=1024)
    ids = _ids(tokenizer, n)
    started = time.perf_counter()
    outputs = model.generate_batch(
        inputs=ids, generation_config=config, continuous_batching_config=batching, persistent_manager=True
    )
    generated = sum(len(out.generated_tokens) for out in outputs.values())
    return generated / (time.perf_counter() - started)


def sluice_engine(engine: Engine, n: int, tokens: int) -> float:
    greedy = SamplingConfig(temperature=0, ignore_eos=True)
    ids = _ids(engine.loaded.tokenizer, n)
    started = time.perf_counter()
    handles = [engine.submit(GenerationRequest(f"b{i}", p, tokens, greedy)) for i, p in enumerate(ids)]
    total = sum(len(step.token_ids) for handle in handles for step in handle)
    return total / (time.perf_counter() - started)


# tokens/s of each in-process contender, by the number of requests given to it at once
InProcess = dict[int, dict[str, float]]
SEQUENTIAL = "sequential generate (4 requests)"


def in_process(model_dir: Path, levels: list[int], tokens: int, repeats: int, dtype: str) -> InProcess:
    """tokens/s of each in-process contender on n requests for every n in `levels`, alternated
    `repeats` times, medians; and sequential generate once, on 4 requests. Every contender runs
    on the torch threads the inference service would choose for this model."""
    # The engines choose their threads as the service does (measured on the model they run);
    # every other contender then runs on the same number.
    fast = Engine(load_model(model_dir, "cpu", dtype=dtype), EngineLimits(torch_threads=0))
    invariant = Engine(load_model(model_dir, "cpu", dtype=dtype), EngineLimits(batch_invariant=True))
    assert fast.threads is not None
    torch.set_num_threads(fast.threads.threads)
    print(f"  torch threads: {fast.threads.threads} ({fast.threads.reason})", flush=True)
    loaded = load_model(model_dir, "cpu", dtype=dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    medians: InProcess = {}
    for n in levels:
        # A fresh copy per level: generate_batch changes the model's attention settings, and its
        # persistent manager, once it has served single requests, ran 16 at once at a fifth of
        # the speed a fresh one does.
        cb_model = load_model(model_dir, "cpu", dtype=dtype).model
        contenders: dict[str, Callable[[], float]] = {
            "Sluice engine": partial(sluice_engine, fast, n, tokens),
            "Sluice engine, batch_invariant": partial(sluice_engine, invariant, n, tokens),
            "static padded batch (generate)": partial(static_batch, model, tokenizer, n, tokens),
            "transformers CB (generate_batch)": partial(transformers_cb, cb_model, tokenizer, n, tokens),
        }
        for run in contenders.values():
            run()  # warm-up: first calls at a batch size pay one-off costs
        results: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(repeats):
            for name, run in contenders.items():
                results[name].append(run())
        medians[n] = {name: _median(values) for name, values in results.items()}
        print(f"  {n} requests done", flush=True)
    medians[0] = {SEQUENTIAL: sequential(model, tokenizer, 4, tokens)}
    return medians


def _print_in_process(local: InProcess, levels: list[int]) -> None:
    print(f"{'in-process, tokens/s':36}" + "".join(f"{f'{n} req':>9}" for n in levels))
    for name in local[levels[0]]:
        print(f"{name:36}" + "".join(f"{local[n][name]:9.0f}" for n in levels))
    for name in ("static padded batch (generate)", "transformers CB (generate_batch)"):
        label = f"engine / {name.split(' (')[0]}"
        print(f"{label:36}" + "".join(f"{local[n]['Sluice engine'] / local[n][name]:8.2f}x" for n in levels))
    print(f"{SEQUENTIAL}: {local[0][SEQUENTIAL]:.0f} tokens/s\n")


# ---------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Peer:
    """A peer server on a free port: `transformers serve --continuous-batching`, or vLLM's OpenAI
    server (its CPU build, from its own virtualenv). Both load the model in `dtype` and run with
    the same process environment as Sluice's inference service."""

    def __init__(
        self, name: str, model: str, argv: list[str], work: Path, port: int, env: dict[str, str], timeout_s: float = 300
    ) -> None:
        self.name, self.model, self.port = name, model, port
        # vLLM, like Sluice, takes ignore_eos: every request then generates its max_tokens.
        self.extra: dict = {"extra_body": {"ignore_eos": True}} if name == "vLLM" else {}
        self.log_path = work / f"{name.replace(' ', '-')}.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, **INFERENCE_ENVIRONMENT, **env}
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:  # both bind their port once the model is loaded
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{name} did not start:\n{self.log_path.read_text(errors='replace')[-2000:]}")

    @classmethod
    def transformers_serve(cls, model_dir: Path, work: Path, dtype: str) -> Peer:
        port = _free_port()
        cli = str(Path(sys.executable).with_name("transformers"))
        batching = ["--continuous-batching", "--cb-num-blocks", "32", "--cb-max-batch-tokens", "1024"]
        address = ["--host", "127.0.0.1", "--port", str(port)]
        argv = [cli, "serve", *batching, "--dtype", dtype, *address, str(model_dir)]
        return cls("transformers serve", str(model_dir), argv, work, port, {})

    @classmethod
    def vllm(cls, venv: Path, model_dir: Path, work: Path, dtype: str) -> Peer:
        """vLLM's CPU build as its documentation runs it: eager, its threads unbound, a KV budget."""
        port = _free_port()
        served = ["serve", str(model_dir), "--served-model-name", model_dir.name]
        address = ["--host", "127.0.0.1", "--port", str(port)]
        engine = ["--dtype", dtype, "--enforce-eager", "--max-model-len", "2048", "--disable-log-stats"]
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
        return cls("vLLM", model_dir.name, [str(venv / "bin" / "vllm"), *served, *address, *engine], work, port, env)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def memory_at_32_unbounded(mesh: Mesh, tokens: int) -> tuple[int, int, int]:
    """(peak RSS of inference, weights bytes, peak KV bytes in use) while 32 streams with
    max_tokens unset each read `tokens` tokens and then leave."""
    pid = mesh.child("inference")["pid"]
    peak_rss = peak_blocks = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak_rss, peak_blocks
        while not done.is_set():
            peak_rss = max(peak_rss, _rss_bytes(pid))
            used = mesh.metric("inference", "sluice_inference_kv_blocks", state="used")
            peak_blocks = max(peak_blocks, int(used))
            time.sleep(0.2)

    async def stream_then_leave(client: openai.AsyncOpenAI) -> None:
        seen = 0
        stream = await client.chat.completions.create(
            model=mesh.model_dir.name,
            messages=[{"role": "user", "content": prompt()}],
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
            extra_headers={"Cache-Control": "no-cache"},
        )
        async for chunk in stream:
            seen += bool(chunk.choices and chunk.choices[0].delta.content)
            if seen >= tokens:
                break
        await stream.close()

    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=mesh.base_url, api_key="unused", max_retries=0) as client:
            await asyncio.gather(*(stream_then_leave(client) for _ in range(32)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        asyncio.run(run())
    finally:
        done.set()
        watcher.join()
    model = load_model(mesh.model_dir, "cpu", dtype="float32").model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    block_bytes = kv_geometry(model).bytes_per_token(model.dtype) * EngineLimits().kv_block_size
    return peak_rss, weights, peak_blocks * block_bytes


def _torch_threads_line(mesh: Mesh) -> str:
    """What the inference service chose for torch's threads, and why (its start-up log line)."""
    log_text = (mesh.log_dir / "inference.log").read_text(errors="replace")
    for line in log_text.splitlines():
        if "torch threads" in line:
            return json.loads(line)["message"]
    return "torch threads: not logged"


def _pause(process: subprocess.Popen, paused: bool) -> None:
    """Freeze or thaw a server's whole process group, so the idle contender takes no CPU."""
    os.killpg(process.pid, signal.SIGSTOP if paused else signal.SIGCONT)


REPO = Path(__file__).resolve().parents[1]
VLLM_ENGINE_MESH = "mesh, vLLM worker"
# The mesh's processes whose CPU time is counted per token (the load generator's too).
MESH_PROCESSES = ("edge", "preprocess", "inference", "cache")


def _baseline_mesh(rev: str, work: Path, certs: Path, model_dir: Path, mesh_args: list[str]) -> Mesh:
    """The mesh of revision `rev`, from a worktree of it in `work` (removed with the work folder)."""
    tree = work / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True)
    run = work / "baseline-run"
    run.mkdir()
    print(f"  baseline mesh from {rev}…", flush=True)
    return start_mesh(run, certs, model_dir, *mesh_args, repo=tree)


def _with_inference_environment() -> None:
    """Run as the inference service runs (`sluice up` gives it INFERENCE_ENVIRONMENT, which glibc
    reads at start): the in-process contenders and every server then have the same environment."""
    missing = {k: v for k, v in INFERENCE_ENVIRONMENT.items() if k not in os.environ}
    if missing:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})


def main() -> None:
    _with_inference_environment()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="model to measure")
    parser.add_argument("--concurrency", default="1,4,16,32", help="comma-separated client counts")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per measurement (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of the contenders (default 3)")
    parser.add_argument("--skip-peer", action="store_true", help="do not start transformers serve")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="every contender's number format (auto: what the inference service would choose here)",
    )
    parser.add_argument(
        "--vllm",
        type=Path,
        default=REPO / ".venv-vllm",
        help="virtualenv of vLLM's CPU build, run as a peer when it is there (default .venv-vllm)",
    )
    parser.add_argument("--skip-in-process", action="store_true", help="servers only")
    parser.add_argument("--mesh-arg", action="append", default=[], help="extra `sluice up` argument (repeatable)")
    parser.add_argument(
        "--vllm-engine",
        action="store_true",
        help="also run the mesh with a vLLM worker as its engine (sluice up --engine vllm; needs --vllm's build)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the mesh of this git revision (from a worktree of it), alternated with the working "
        "tree's: a change measured against the code before it",
    )
    parser.add_argument(
        "--charts", type=Path, default=Path(__file__).parent / "results", help="where the PNG chart goes"
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    dtype = str(pick_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"building the {args.preset} model…", flush=True)
        model_dir = build_default_model(work / f"sluice-{args.preset}", shape=PRESETS[args.preset])
        local: InProcess = {}
        if not args.skip_in_process:
            print("in-process contenders…", flush=True)
            local = in_process(model_dir, levels, args.tokens, args.repeats, dtype)

        certs = work / "certs"
        init_certs(certs)
        print("starting the Sluice mesh and transformers serve…", flush=True)
        mesh_args = ["--dtype", dtype, *args.mesh_arg]
        mesh = start_mesh(work, certs, model_dir, *mesh_args)
        print(f"  inference: {_torch_threads_line(mesh)}", flush=True)
        peers: list[Peer] = []
        baseline = engine_mesh = None
        try:
            servers = [
                (
                    Server(
                        "Sluice mesh",
                        mesh.base_url,
                        model_dir.name,
                        {
                            "extra_body": {"ignore_eos": True},
                            "extra_headers": {"Cache-Control": "no-cache"},
                        },
                        {name: mesh.child(name)["pid"] for name in MESH_PROCESSES},
                    ),
                    mesh.process,
                )
            ]
            if args.vllm_engine:
                run = work / "vllm-engine-run"
                run.mkdir()
                worker_flags = ["--engine", "vllm", "--vllm-command", str(args.vllm / "bin" / "vllm")]
                engine_mesh = start_mesh(run, certs, model_dir, *mesh_args, *worker_flags, timeout=900)
                extra = servers[0][0].extra
                server = Server(VLLM_ENGINE_MESH, engine_mesh.base_url, model_dir.name, extra)
                servers.append((server, engine_mesh.process))
            if args.baseline:
                # The revision's own settings: it may predate --dtype (then it runs float32).
                baseline = _baseline_mesh(args.baseline, work, certs, model_dir, args.mesh_arg)
                extra = servers[0][0].extra
                servers.append(
                    (Server(f"mesh @{args.baseline}", baseline.base_url, model_dir.name, extra), baseline.process)
                )
            starters: list[Callable[[], Peer]] = []
            if not args.skip_peer:
                starters.append(partial(Peer.transformers_serve, model_dir, work, dtype))
            if (args.vllm / "bin" / "vllm").exists():
                starters.append(partial(Peer.vllm, args.vllm, model_dir, work, dtype))
            for start in starters:
                try:
                    peer = start()
                except RuntimeError as err:
                    print(f"peer skipped: {err}", flush=True)
                    continue
                peers.append(peer)
                server = Server(peer.name, f"http://127.0.0.1:{peer.port}/v1", peer.model, peer.extra)
                servers.append((server, peer.process))
            for _, process in servers:
                _pause(process, True)
            results: dict[tuple[str, int], list[LoadResult]] = {}
            for server, process in servers:  # warm-up
                _pause(process, False)
                server.load(2, 8, 1)
                _pause(process, True)
            for level in levels:
                for _ in range(args.repeats):
                    for server, process in servers:
                        _pause(process, False)
                        # A thawed server's first request pays for the freeze (keepalives and
                        # health checks that came due meanwhile): it is not timed.
                        server.load(1, 2, 1)
                        results.setdefault((server.name, level), []).append(
                            server.load(level, args.tokens, args.rounds)
                        )
                        _pause(process, True)
                print(f"  {level} clients done", flush=True)
            _pause(mesh.process, False)
            memory = memory_at_32_unbounded(mesh, args.tokens)
        finally:
            for _, process in servers:
                _pause(process, False)
            mesh.stop()
            for peer in peers:
                peer.stop()
            if engine_mesh is not None:
                engine_mesh.stop()
            if baseline is not None:
                baseline.stop()
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "baseline")])

    print(f"\n{args.preset} model, {args.tokens} new tokens, greedy, medians of {args.repeats} alternated runs\n")
    if local:
        _print_in_process(local, levels)
    print(f"{'server':20} {'clients':>7} {'tokens/s':>9} {'TTFT p50':>9} {'ITL p50':>8} {'errors':>6}")
    for (name, level), runs in results.items():
        print(
            f"{name:20} {level:7d} {_median([r.tokens_per_s for r in runs]):9.0f} "
            f"{_median([r.ttft_p50 for r in runs]) * 1e3:7.0f}ms {_median([r.itl_p50 for r in runs]) * 1e3:6.1f}ms "
            f"{sum(r.errors for r in runs):6d}"
        )
    print("\nCPU per generated token in the mesh's processes and the load generator (ms, medians):")
    watched = [*MESH_PROCESSES, "load generator"]
    print(f"{'clients':>7} " + " ".join(f"{name:>15}" for name in watched))
    for level in levels:
        runs = results[("Sluice mesh", level)]
        cells = " ".join(f"{_median([r.cpu_ms_per_token(name) for r in runs]):15.2f}" for name in watched)
        print(f"{level:7d} {cells}")
    print()
    for level in levels:
        ours = results[("Sluice mesh", level)]
        line = f"c={level}:"
        worker_mesh, own_server = results.get((VLLM_ENGINE_MESH, level)), results.get(("vLLM", level))
        if worker_mesh and own_server:
            line += f" mesh(vLLM worker)/vLLM {_ratio(worker_mesh, own_server, 'tokens_per_s'):.2f}x"
            ttft = (_median([r.ttft_p50 for r in worker_mesh]) - _median([r.ttft_p50 for r in own_server])) * 1e3
            line += f" (TTFT {ttft:+.0f} ms),"
        before = results.get((f"mesh @{args.baseline}", level))
        if before:
            line += f" mesh/baseline {_ratio(ours, before, 'tokens_per_s'):.2f}x,"
            line += f" TTFT p50 mesh/baseline {_ratio(ours, before, 'ttft_p50'):.2f}x,"
        for peer_name in ("transformers serve", "vLLM"):
            theirs = results.get((peer_name, level))
            if theirs:
                line += f" mesh/{peer_name.replace(' ', '-')} {_ratio(ours, theirs, 'tokens_per_s'):.2f}x"
                line += f" (TTFT {_ratio(ours, theirs, 'ttft_p50'):.2f}x),"
        if local:
            engine = local[level]["Sluice engine"]
            line += f", mesh/engine in-process {_median([r.tokens_per_s for r in ours]) / engine:.2f}x"
        print(line)
    chart = concurrency_chart(
        args.charts / f"concurrency-{args.preset}.png",
        f"{args.preset} model, {args.tokens} new tokens, greedy (medians of {args.repeats} alternated runs)",
        _series(results, levels, local),
    )
    print(f"\nchart: {chart}")
    rss, weights, kv = memory
    budget = EngineLimits().kv_cache_bytes
    print(
        f"\ninference RSS at 32 streams, max_tokens unset: peak {rss / 2**20:.0f} MiB; weights "
        f"{weights / 2**20:.0f} MiB + peak KV in use {kv / 2**20:.1f} MiB (budget {budget >> 20} MiB)"
    )


def _series(results: dict[tuple[str, int], list[LoadResult]], levels: list[int], local: InProcess) -> list[Series]:
    servers = sorted({name for name, _ in results}, key=lambda name: name != "Sluice mesh")
    series = [
        Series(
            name,
            [c for c in levels if (name, c) in results],
            [_median([r.tokens_per_s for r in results[(name, c)]]) for c in levels if (name, c) in results],
            [_median([r.ttft_p50 for r in results[(name, c)]]) for c in levels if (name, c) in results],
        )
        for name in servers
    ]
    if local:
        series.append(Series("Sluice engine in-process", levels, [local[n]["Sluice engine"] for n in levels], []))
    return series


def _ratio(ours: list[LoadResult], theirs: list[LoadResult], figure: str) -> float:
    """ours / theirs, of the medians (nan when theirs is 0: a contender whose every request failed)."""
    denominator = _median([getattr(r, figure) for r in theirs])
    return _median([getattr(r, figure) for r in ours]) / denominator if denominator else float("nan")


if __name__ == "__main__":
    main()
