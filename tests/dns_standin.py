"""A real DNS server on loopback (dnslib) serving a zone the test edits, the way a cluster's DNS
answers for headless Services: name → the addresses of its ready pods; anything else NXDOMAIN."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dnslib import AAAA, QTYPE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSServer


class Zone(BaseResolver):
    def __init__(self) -> None:
        self.names: dict[str, list[str]] = {}
        self.server = ""  # host:port, once serving

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        if name not in self.names:
            reply.header.rcode = 3  # NXDOMAIN
            return reply
        for address in self.names[name]:
            v6 = ":" in address
            if request.q.qtype == (QTYPE.AAAA if v6 else QTYPE.A):
                rdata = AAAA(address) if v6 else A(address)
                reply.add_answer(RR(request.q.qname, request.q.qtype, rdata=rdata, ttl=1))
        return reply


@contextmanager
def dns_zone() -> Iterator[Zone]:
    zone = Zone()
    server = DNSServer(zone, address="127.0.0.1", port=0)
    server.start_thread()
    zone.server = f"127.0.0.1:{server.server.server_address[1]}"
    try:
        yield zone
    finally:
        server.stop()
