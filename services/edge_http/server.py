"""Run the edge: bind the HTTP port, serve the ASGI app with uvicorn, report readiness."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import uvicorn

from services.edge_http.http_api.app import create_app
from services.edge_http.http_api.intake import HEADER_READ_LIMIT_BYTES
from services.mesh.config import Settings, is_loopback
from services.mesh.lifecycle.ready import ReadyInfo, advertised_address, write_ready
from services.mesh.rpc.tls import warn_if_insecure

log = logging.getLogger(__name__)

OPEN_DOOR_WARNING = "NO API KEY REQUIRED on {host} (--public-without-auth): anyone who reaches the port is served"


class _ReportingServer(uvicorn.Server):
    """uvicorn server that reports once it really accepts connections."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()


def listening_socket(host: str, port: int) -> socket.socket:
    """The edge's bound TCP socket. Its protocol is named (IPPROTO_TCP): asyncio turns Nagle's
    algorithm off only on connections whose socket says TCP, and with Nagle on, a streamed
    response on a reused connection waited for the client's delayed ACK of its headers (40 ms)
    before its first token, then sent its tokens in one burst."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def run(settings: Settings, ready_file: Path | None) -> int:
    warn_if_insecure(settings)
    if not settings.auth and not is_loopback(settings.listen_host):
        log.warning("%s", OPEN_DOOR_WARNING.format(host=settings.listen_host))
    sock = listening_socket(settings.listen_host, settings.edge_port)
    address = advertised_address(settings.listen_host, sock.getsockname()[1])

    def started() -> None:
        log.info("edge serving the OpenAI API at http://%s/v1", address)
        if ready_file is not None:
            write_ready(ready_file, ReadyInfo("edge", address, address, os.getpid()))

    config = uvicorn.Config(
        create_app(settings),
        log_level=settings.log_level,
        log_config=None,  # uvicorn's own lines go through the mesh's (JSON) handler
        timeout_graceful_shutdown=int(settings.drain_grace_s),
        access_log=False,
        h11_max_incomplete_event_size=HEADER_READ_LIMIT_BYTES,
    )
    _ReportingServer(config, started).run(sockets=[sock])
    return 0
