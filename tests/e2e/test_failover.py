"""Two real inference replicas under a bounded streaming load, one of them killed or drained
mid-load: nothing hangs, nothing is lost, and what had already streamed ends visibly."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import openai
from meshproc import Mesh, streamed_outcome, wait_for

REQUESTS, CONCURRENCY, TOKENS, DEADLINE_S = 120, 16, 32, 60.0


def _run_load(mesh: Mesh, on_progress: tuple[int, callable]) -> tuple[Counter, list[tuple[float, str]]]:
    """REQUESTS streaming chats, CONCURRENCY at a time; calls on_progress[1]() once on_progress[0]
    requests have completed. Returns outcome counts and (start time, outcome) per request."""
    outcomes: Counter = Counter()
    timeline: list[tuple[float, str]] = []
    trigger_at, trigger = on_progress

    async def one(client: openai.AsyncOpenAI, index: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            started = time.monotonic()
            no_cache = {"Cache-Control": "no-cache"}
            ended = await streamed_outcome(
                client, mesh.model_dir.name, f"failover {index}", TOKENS, DEADLINE_S, extra_headers=no_cache
            )
            outcomes[ended.kind] += 1
            timeline.append((started, ended.kind))
            if sum(outcomes.values()) == trigger_at:
                trigger()

    async def main() -> None:
        gate = asyncio.Semaphore(CONCURRENCY)
        async with openai.AsyncOpenAI(base_url=mesh.base_url, api_key="unused", max_retries=0) as client:
            await asyncio.gather(*(one(client, i, gate) for i in range(REQUESTS)))

    asyncio.run(main())
    return outcomes, timeline


def _gone(pid: int) -> bool:
    """Dead: no process, or a zombie its parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_kill_9_of_one_replica_mid_load_loses_and_hangs_nothing(replicated: Mesh) -> None:
    victim = replicated.child("inference-2")["pid"]
    retries_before = replicated.metric("edge", "sluice_edge_upstream_retries_total", service="inference")
    finished = ("inference", "sluice_inference_sequences_finished_total")
    survivor_before = replicated.metric(*finished, reason="length")
    killed_at: list[float] = []

    def kill() -> None:
        os.kill(victim, signal.SIGKILL)
        # SIGKILL lands asynchronously: "after the kill" starts once the process is really gone.
        assert wait_for(lambda: _gone(victim), timeout=5)
        killed_at.append(time.monotonic())

    outcomes, timeline = _run_load(replicated, (REQUESTS // 4, kill))
    retried = replicated.metric("edge", "sluice_edge_upstream_retries_total", service="inference") - retries_before
    print(f"\nkill -9: {REQUESTS} sent, {dict(outcomes)}, {retried:.0f} retried")
    assert killed_at, "the replica was never killed"
    assert outcomes["hung"] == outcomes["truncated"] == outcomes["failed before tokens"] == 0, outcomes
    assert outcomes["completed"] + outcomes["error after tokens"] == REQUESTS
    after = [outcome for started, outcome in timeline if started > killed_at[0]]
    assert after and set(after) == {"completed"}
    # Both replicas really served before the kill: the survivor alone cannot explain the errors.
    assert replicated.metric(*finished, reason="length") - survivor_before < REQUESTS
    assert "inference-2 was killed by SIGKILL; restarting it" in (replicated.log_dir.parent / "up.log").read_text()


def test_sigterm_of_one_replica_mid_load_fails_nothing(replicated: Mesh) -> None:
    victim = replicated.child("inference-2")["pid"]
    outcomes, _ = _run_load(replicated, (REQUESTS // 4, lambda: os.kill(victim, signal.SIGTERM)))
    print(f"\nSIGTERM: {REQUESTS} sent, {dict(outcomes)}")
    assert outcomes == Counter({"completed": REQUESTS})
    # It exits 0 once its own calls are done (the edge's health watch does not hold it), and is
    # started again: nobody asked the supervisor to stop it.
    up_log = replicated.log_dir.parent / "up.log"
    assert wait_for(lambda: "inference-2 exited with code 0; restarting it" in up_log.read_text(), 30)
