"""Start services as child processes, keep them running, stop them all cleanly.

A child that exits when nobody asked it to is started again after a backoff that doubles
with each recent restart (0.5 s, 1 s, 2 s, … up to 30 s). One that would need more than
`crash_loop` restarts within `window_s` is crash-looping: the supervisor gives up on it and
says why, and its caller stops the mesh. A Sluice service comes back on the ports it first
bound (`ChildSpec.pinned_env`), so the addresses its callers and discovery hold stay valid.

Each child leads a process group of its own, and the group goes with it: a child's own
children (a vLLM worker's engine-core and worker processes) are signalled with it when the
mesh stops and killed when it exits, so no orphan holds memory, a GPU or a port after it.
Children get PR_SET_PDEATHSIG on Linux, so even a supervisor killed with SIGKILL leaves no
orphan servers behind (the children's own children then depend on their parent's handling).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from prometheus_client import Counter, Gauge

from services.mesh.lifecycle.ready import ReadyInfo, read_ready
from services.mesh.lifecycle.signals import StopSignals

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

RESTARTS = Counter("sluice_supervisor_restarts_total", "Children of `sluice up` restarted after they exited", ["child"])
CHILD_UP = Gauge("sluice_supervisor_child_up", "1 while a child of `sluice up` runs and is ready", ["child"])


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(child: Child, signum: signal.Signals) -> None:
    """Signal the child's process group (its pid: each child leads one); a group already gone
    is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.process.pid, signum)


class ChildFailed(RuntimeError):
    pass


class CrashLoop(ChildFailed):
    """A child kept exiting: restarting it again would not help."""


@dataclass(frozen=True)
class RestartPolicy:
    first_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    crash_loop: int = 5  # this many restarts within window_s, and the next exit ends the mesh
    window_s: float = 60.0


class RestartHistory:
    """When a child that exited may start again. Pure logic: the caller passes the time."""

    def __init__(self, policy: RestartPolicy) -> None:
        self._policy = policy
        self._restarts: deque[float] = deque()

    def next_start(self, exited_at: float) -> float | None:
        """The time to restart a child that exited at `exited_at`, or None for a crash loop."""
        policy = self._policy
        while self._restarts and exited_at - self._restarts[0] > policy.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= policy.crash_loop:
            return None
        delay = min(policy.max_backoff_s, policy.first_backoff_s * 2 ** len(self._restarts))
        self._restarts.append(exited_at)
        return exited_at + delay


class State(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"  # exited; started again at Child.restart_at
    FAILED = "failed"  # crash loop: given up
    STOPPED = "stopped"


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    # Sluice services are told where to write their ready file; other programs (None) count
    # as ready once started and are waited for by their own means.
    ready_flag: str | None = "--ready-file"
    # Extra environment for a restart, from what the first start reported (its ports).
    pinned_env: Callable[[ReadyInfo], Mapping[str, str]] = lambda _: {}


@dataclass
class Child:
    spec: ChildSpec
    ready_file: Path
    log_path: Path | None
    history: RestartHistory
    process: subprocess.Popen = field(init=False, repr=False)
    log_handle: IO[bytes] | None = field(default=None, repr=False)
    state: State = State.STARTING
    ready: ReadyInfo | None = None
    restarts: int = 0
    started_at: float = 0.0  # wall clock, for uptimes
    starting_since: float = 0.0  # supervisor clock: when its latest start began
    restart_at: float = 0.0  # supervisor clock

    @property
    def name(self) -> str:
        return self.spec.name

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class Supervisor:
    def __init__(
        self,
        run_dir: Path,
        log_dir: Path | None = None,
        policy: RestartPolicy = RestartPolicy(),
        startup_timeout_s: float = 300.0,
        stop: StopSignals | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run_dir = run_dir
        self._log_dir = log_dir
        self._policy = policy
        self._startup_timeout_s = startup_timeout_s
        self._stop = stop
        self._clock = clock
        self.children: list[Child] = []

    def start(self, spec: ChildSpec) -> Child:
        log_path = self._log_dir / f"{spec.name}.log" if self._log_dir is not None else None
        child = Child(spec, self._run_dir / f"{spec.name}.ready.json", log_path, RestartHistory(self._policy))
        self._spawn(child, spec.env)
        self.children.append(child)
        return child

    def _spawn(self, child: Child, env: Mapping[str, str]) -> None:
        child.ready_file.unlink(missing_ok=True)
        if child.log_path is not None:
            child.log_path.parent.mkdir(parents=True, exist_ok=True)
            child.log_handle = child.log_path.open("ab")
        ready_flag = child.spec.ready_flag
        child.process = subprocess.Popen(
            [*child.spec.argv, ready_flag, str(child.ready_file)] if ready_flag else list(child.spec.argv),
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=child.log_handle,
            stderr=subprocess.STDOUT if child.log_handle else None,
            preexec_fn=_die_with_parent,
            process_group=0,
        )
        child.state, child.started_at, child.starting_since = State.STARTING, time.time(), self._clock()

    def _interrupted(self) -> bool:
        return self._stop is not None and self._stop.received is not None

    def wait_ready(self, child: Child, timeout: float) -> ReadyInfo:
        """Block until a first start reports ready (ChildFailed if it exits, times out or Ctrl-C comes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._interrupted():
            info = read_ready(child.ready_file)
            if info is not None:
                self.mark_ready(child, info)
                return info
            if child.process.poll() is not None:
                raise ChildFailed(
                    f"{child.name} {describe_exit(child.process.returncode)} before it was ready\n{child.log_tail()}"
                )
            time.sleep(0.05)
        if self._interrupted():
            raise ChildFailed(f"interrupted while waiting for {child.name}")
        raise ChildFailed(f"{child.name} was not ready after {timeout:.0f}s\n{child.log_tail()}")

    def mark_ready(self, child: Child, info: ReadyInfo) -> None:
        """The child serves at `info`: from its ready file, or from its starter for a program
        without one (Envoy)."""
        child.ready, child.state = info, State.RUNNING
        CHILD_UP.labels(child.name).set(1)

    def supervise(self) -> bool:
        """One pass over the children: notice exits, restart those whose backoff is over, see
        restarted ones become ready. True when any child changed state; CrashLoop when one keeps
        exiting."""
        now = self._clock()
        changed = False
        for child in self.children:
            if child.state in (State.STARTING, State.RUNNING) and child.process.poll() is not None:
                self._exited(child, now)
                changed = True
            elif child.state is State.RESTARTING and now >= child.restart_at:
                self._restart(child)
                changed = True
            elif child.state is State.STARTING:
                changed |= self._check_restarted(child, now)
        return changed

    def _exited(self, child: Child, now: float) -> None:
        CHILD_UP.labels(child.name).set(0)
        _signal_group(child, signal.SIGKILL)  # what it left running would outlive it
        if child.log_handle:
            child.log_handle.close()
        how = describe_exit(child.process.returncode)
        restart_at = child.history.next_start(now)
        if restart_at is None:
            child.state = State.FAILED
            policy = self._policy
            raise CrashLoop(
                f"{child.name} {how} and has been restarted {policy.crash_loop} times within "
                f"{policy.window_s:.0f}s: giving up on it. Its last log lines:\n{child.log_tail()}"
            )
        child.state, child.restart_at = State.RESTARTING, restart_at
        log.error("%s %s; restarting it in %.1fs\n%s", child.name, how, restart_at - now, child.log_tail(10))

    def _restart(self, child: Child) -> None:
        pinned = child.spec.pinned_env(child.ready) if child.ready is not None else {}
        self._spawn(child, {**child.spec.env, **pinned})
        child.restarts += 1
        RESTARTS.labels(child.name).inc()
        log.warning("%s restarted (restart %d)", child.name, child.restarts)
        if child.spec.ready_flag is None and child.ready is not None:
            self.mark_ready(child, replace(child.ready, pid=child.process.pid))

    def _check_restarted(self, child: Child, now: float) -> bool:
        info = read_ready(child.ready_file)
        if info is not None:
            self.mark_ready(child, info)
            log.warning("%s is back at %s", child.name, info.address)
            return True
        if now - child.starting_since > self._startup_timeout_s:
            log.error("%s was not ready %.0fs after its restart; killing it", child.name, self._startup_timeout_s)
            child.process.kill()  # the next pass sees it exit and decides again
        return False

    def stop_all(self, grace_s: float) -> None:
        """SIGTERM everyone (the edge first: it stops taking requests), then SIGKILL stragglers."""
        for child in self.children:
            child.state = State.STOPPED  # exits from here on are expected: nothing restarts
        for child in reversed(self.children):
            if child.process.poll() is None:
                _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", child.name, grace_s)
                child.process.kill()
                child.process.wait()
            _signal_group(child, signal.SIGKILL)  # whatever of its group did not go with it
            if child.log_handle:
                child.log_handle.close()
