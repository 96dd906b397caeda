"""A real redis-server for tests: its own instance on a free port, always stopped."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from meshproc import wait_for


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """Yield the URL of a fresh, empty Redis (no persistence); `make test` installs redis-server."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: run `make test` (it installs it) or apt-get install redis-server"
    port = _free_port()
    no_persistence = ["--save", "", "--appendonly", "no"]
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", *no_persistence, "--dir", str(workdir)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"

    def answers() -> bool:
        try:
            return redis.Redis.from_url(url, socket_timeout=0.5).ping()
        except redis.RedisError:
            return False

    try:
        assert wait_for(answers, timeout=20), "redis-server did not start"
        yield url
    finally:
        process.kill()
        process.wait()
