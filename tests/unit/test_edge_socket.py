"""The edge's listening socket: connections accepted on it send small writes at once (no Nagle),
so a streamed token never waits for the client's delayed ACK."""

from __future__ import annotations

import asyncio
import socket

from services.edge_http.server import listening_socket


async def _accepted_nodelay(sock: socket.socket) -> int:
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            conn = transport.get_extra_info("socket")
            accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
    async with server:
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(accepted, 5)
        finally:
            writer.close()


def test_connections_the_edge_accepts_have_nagle_off() -> None:
    assert asyncio.run(_accepted_nodelay(listening_socket("127.0.0.1", 0))) != 0


def test_a_socket_without_its_protocol_named_would_keep_nagle_on() -> None:
    # Why listening_socket names IPPROTO_TCP: asyncio leaves Nagle on for a socket whose protocol is 0.
    plain = socket.socket(socket.AF_INET)
    plain.bind(("127.0.0.1", 0))
    assert asyncio.run(_accepted_nodelay(plain)) == 0
