"""Start services as child processes, wait for their ready files, stop them all cleanly.

Children get PR_SET_PDEATHSIG on Linux, so even a supervisor killed with SIGKILL leaves
no orphan servers behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from services.mesh.ready import ReadyInfo, read_ready

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ChildFailed(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    ready_file: Path
    log_path: Path | None
    log_handle: IO[bytes] | None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Supervisor:
    def __init__(self, run_dir: Path, log_dir: Path | None = None) -> None:
        self._run_dir = run_dir
        self._log_dir = log_dir
        self.children: list[Child] = []
        self._reported: set[str] = set()

    def start(self, name: str, argv: list[str], env: dict[str, str], ready_flag: str | None = "--ready-file") -> Child:
        """Start a child; Sluice services are told where to write their ready file (`ready_flag`),
        other programs (ready_flag=None) are waited for by their own means."""
        ready_file = self._run_dir / f"{name}.ready.json"
        ready_file.unlink(missing_ok=True)
        log_path = log_handle = None
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self._log_dir / f"{name}.log"
            log_handle = log_path.open("ab")
        process = subprocess.Popen(
            [*argv, ready_flag, str(ready_file)] if ready_flag else argv,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=log_handle,
            stderr=subprocess.STDOUT if log_handle else None,
            preexec_fn=_die_with_parent,
        )
        child = Child(name, process, ready_file, log_path, log_handle)
        self.children.append(child)
        return child

    def wait_ready(self, child: Child, timeout: float) -> ReadyInfo:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = read_ready(child.ready_file)
            if info is not None:
                return info
            if child.process.poll() is not None:
                raise ChildFailed(
                    f"{child.name} exited with code {child.process.returncode} before it was ready\n{child.log_tail()}"
                )
            time.sleep(0.05)
        raise ChildFailed(f"{child.name} was not ready after {timeout:.0f}s\n{child.log_tail()}")

    def newly_exited(self) -> list[Child]:
        """Children that exited since the last call."""
        exited = [c for c in self.children if c.process.poll() is not None and c.name not in self._reported]
        self._reported.update(c.name for c in exited)
        return exited

    def running(self) -> list[Child]:
        return [c for c in self.children if c.process.poll() is None]

    def stop_all(self, grace_s: float) -> None:
        """SIGTERM everyone (the edge first: it stops taking requests), then SIGKILL stragglers."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", child.name, grace_s)
                child.process.kill()
                child.process.wait()
            if child.log_handle:
                child.log_handle.close()
