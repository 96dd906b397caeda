"""The supervisor behind `sluice up`, on real child processes: a killed child comes back on the
ports it had, a crash loop ends with the reason, a stop never restarts anything, and what a
child started itself goes with it."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from meshproc import wait_for
from prometheus_client import REGISTRY

from services.mesh.lifecycle.ready import ReadyInfo
from services.mesh.lifecycle.supervisor import (
    ChildSpec,
    CrashLoop,
    RestartHistory,
    RestartPolicy,
    State,
    Supervisor,
)

# A stand-in service: binds "a port" (PORT, or one of its own when 0 as on a first start),
# reports it in its ready file like a Sluice service, then runs until stopped (or exits with
# EXIT_AFTER's code after a moment, to play a crashing service).
CHILD = """
import json, os, sys, time
ready = sys.argv[sys.argv.index("--ready-file") + 1]
port = int(os.environ.get("PORT", "0")) or 20000 + os.getpid() % 20000
info = {"service": "toy", "address": f"127.0.0.1:{port}", "metrics": "127.0.0.1:1", "pid": os.getpid()}
with open(ready + ".tmp", "w") as f:
    json.dump(info, f)
os.replace(ready + ".tmp", ready)
if "GRANDCHILD" in os.environ:  # a process of its own, as a vLLM worker starts its engine core
    import subprocess
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(os.environ["GRANDCHILD"], "w") as f:
        f.write(str(grandchild.pid))
if "EXIT_AFTER" in os.environ:
    time.sleep(0.05)
    sys.exit(int(os.environ["EXIT_AFTER"]))
time.sleep(120)
"""
FAST = RestartPolicy(first_backoff_s=0.01, max_backoff_s=0.05, crash_loop=3, window_s=60)


def _spec(name: str, **env: str) -> ChildSpec:
    return ChildSpec(
        name,
        (sys.executable, "-c", CHILD),
        env,
        pinned_env=lambda info: {"PORT": info.address.rpartition(":")[2]},
    )


def _restarts(child: str) -> float:
    return REGISTRY.get_sample_value("sluice_supervisor_restarts_total", {"child": child}) or 0.0


@pytest.fixture
def supervisor(tmp_path: Path):
    running = Supervisor(tmp_path, tmp_path / "logs", FAST, startup_timeout_s=30)
    yield running
    running.stop_all(5)


def test_restart_backoff_doubles_and_a_crash_loop_is_called() -> None:
    history = RestartHistory(RestartPolicy(first_backoff_s=0.5, max_backoff_s=3, crash_loop=5, window_s=60))
    starts = [history.next_start(t) for t in (0.0, 1.0, 3.0, 7.0, 11.0)]
    assert [s - t for s, t in zip(starts, (0.0, 1.0, 3.0, 7.0, 11.0), strict=True)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert history.next_start(20.0) is None  # a sixth exit within the minute
    later = RestartHistory(RestartPolicy(first_backoff_s=0.5, crash_loop=2, window_s=60))
    assert later.next_start(0.0) == 0.5 and later.next_start(10.0) == 11.0
    assert later.next_start(100.0) == 100.5  # the old restarts left the window: backoff starts over


def test_a_killed_child_is_restarted_on_its_own_port(supervisor: Supervisor) -> None:
    child = supervisor.start(_spec("toy"))
    first: ReadyInfo = supervisor.wait_ready(child, 30)
    restarts_before = _restarts("toy")
    os.kill(first.pid, signal.SIGKILL)
    assert wait_for(lambda: supervisor.supervise() and child.state is State.RUNNING, timeout=30)
    assert child.restarts == 1 and _restarts("toy") == restarts_before + 1
    assert child.ready is not None and child.ready.pid != first.pid
    assert child.ready.address == first.address  # the same port, so callers' addresses stay valid
    assert child.process.poll() is None


def test_a_crash_loop_gives_up_with_the_reason(supervisor: Supervisor) -> None:
    child = supervisor.start(_spec("flaky", EXIT_AFTER="3"))
    supervisor.wait_ready(child, 30)

    raised: list[CrashLoop] = []

    def crash_looped() -> bool:
        try:
            supervisor.supervise()
        except CrashLoop as err:
            raised.append(err)
        return bool(raised)

    assert wait_for(crash_looped, timeout=30)
    assert "flaky exited with code 3" in str(raised[0]) and "restarted 3 times" in str(raised[0])
    assert child.state is State.FAILED and child.restarts == 3


def test_stopping_restarts_nothing(supervisor: Supervisor) -> None:
    children = [supervisor.start(_spec(name)) for name in ("a", "b")]
    pids = [supervisor.wait_ready(child, 30).pid for child in children]
    supervisor.stop_all(5)
    assert not supervisor.supervise()
    assert all(child.state is State.STOPPED and child.process.poll() is not None for child in children)
    assert [child.process.pid for child in children] == pids


def _alive(pid: int) -> bool:
    """The process runs (a zombie, killed and waiting for its reaper, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _grandchild(supervisor: Supervisor, tmp_path: Path) -> tuple[object, int]:
    pid_file = tmp_path / "grandchild.pid"
    child = supervisor.start(_spec("parent", GRANDCHILD=str(pid_file)))
    supervisor.wait_ready(child, 30)
    assert wait_for(lambda: pid_file.exists() and pid_file.read_text(), timeout=10)
    pid = int(pid_file.read_text())
    assert _alive(pid)
    return child, pid


def test_what_a_killed_child_started_dies_with_it(supervisor: Supervisor, tmp_path: Path) -> None:
    child, grandchild = _grandchild(supervisor, tmp_path)
    os.kill(child.process.pid, signal.SIGKILL)  # its own children would be orphans
    assert wait_for(lambda: supervisor.supervise() or child.state is State.RESTARTING, timeout=10)
    assert wait_for(lambda: not _alive(grandchild), timeout=10)


def test_what_a_child_started_stops_with_the_mesh(supervisor: Supervisor, tmp_path: Path) -> None:
    _, grandchild = _grandchild(supervisor, tmp_path)
    supervisor.stop_all(5)
    assert wait_for(lambda: not _alive(grandchild), timeout=10)
