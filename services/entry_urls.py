"""Where clients reach the mesh's public entry, by who is asking: this machine, other machines,
and containers on this machine (Dify's docker compose is the usual case).

A service bound to 127.0.0.1 is reachable from this machine only: not from a container (whose
127.0.0.1 is its own) and not from the network. Bound to every interface (0.0.0.0), it is reached
at each of this host's addresses; containers on Docker's default bridge reach the host at the
bridge's gateway address (docker0), and Docker Desktop also names it host.docker.internal.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil

from services.mesh.config import is_loopback

WILDCARDS_V4 = frozenset({"0.0.0.0", ""})
WILDCARDS_V6 = frozenset({"::", "[::]"})
DOCKER_BRIDGE = "docker0"
DOCKER_NETWORKS = ("br-", "veth")  # user-defined bridges and container ends: not for other machines
DOCKER_DESKTOP_HOST = "host.docker.internal"
CONTAINERS = "Dify in Docker on this machine"


@dataclass(frozen=True)
class EntryURL:
    """One base URL and who should use it."""

    who: str
    url: str
    note: str = ""


def interface_addresses() -> dict[str, list[str]]:
    """This host's IP addresses by interface name (link-local IPv6 left out: it needs a zone)."""
    found: dict[str, list[str]] = {}
    for name, addresses in psutil.net_if_addrs().items():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(address.address.partition("%")[0])
            if not ip.is_link_local:
                found.setdefault(name, []).append(str(ip))
    return found


def _url(scheme: str, host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}/v1"


def entry_urls(bind_host: str, port: int, scheme: str, interfaces: Mapping[str, Sequence[str]]) -> list[EntryURL]:
    """The base URLs to give each kind of client for a listener bound to `bind_host`:`port`."""
    if is_loopback(bind_host):
        here = "127.0.0.1" if bind_host == "localhost" else bind_host
        return [EntryURL("this machine only", _url(scheme, here, port))]
    if bind_host not in WILDCARDS_V4 | WILDCARDS_V6:
        return [EntryURL("this machine and others", _url(scheme, bind_host, port))]
    families = {4, 6} if bind_host in WILDCARDS_V6 else {4}
    urls = [EntryURL("this machine", _url(scheme, "127.0.0.1", port))]
    bridge = ""
    for name, addresses in sorted(interfaces.items()):
        for address in addresses:
            ip = ipaddress.ip_address(address)
            if ip.is_loopback or ip.version not in families:
                continue
            if name == DOCKER_BRIDGE and ip.version == 4:
                bridge = bridge or address
            elif not name.startswith(DOCKER_NETWORKS):  # Docker's own networks; docker0 speaks for them
                urls.append(EntryURL(f"other machines ({name})", _url(scheme, address, port)))
    docker_desktop = _url(scheme, DOCKER_DESKTOP_HOST, port)
    if bridge:
        note = f"{DOCKER_BRIDGE}; Docker Desktop: {docker_desktop}"
        urls.append(EntryURL(CONTAINERS, _url(scheme, bridge, port), note))
    else:
        note = "Docker Desktop; Docker on Linux: the docker0 address, see docs/dify.md"
        urls.append(EntryURL(CONTAINERS, docker_desktop, note))
    return urls
