"""A local stand-in for the Consul agent HTTP API, for tests (no Consul binary can run here).

It serves the endpoints Sluice uses, with Consul's documented request and response shapes:
PUT /v1/agent/service/register and /deregister/<id>, PUT /v1/agent/check/{pass,warn,fail}/<id>,
and GET /v1/health/service/<name> (`passing`, blocking queries with `index`/`wait` and the
`X-Consul-Index` header). Checks behave as the agent's do: TTL checks start critical and
expire without heartbeats; gRPC checks are run by the stand-in itself against grpc.health.v1,
over mTLS with the mesh identity `consul` when GRPCUseTLS is set.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import grpc

from services.mesh.config import Settings
from services.mesh.rpc.health import check
from services.mesh.rpc.tls import channel_credentials


def _duration(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(ms|s|m)", text)
    assert match, f"bad duration {text!r}"
    value, unit = float(match[1]), match[2]
    return value / 1000 if unit == "ms" else value * 60 if unit == "m" else value


def _field(definition: dict, name: str) -> object:
    """Consul accepts CamelCase and snake_case keys alike."""
    wanted = name.replace("_", "").lower()
    return next((v for k, v in definition.items() if k.replace("_", "").lower() == wanted), None)


@dataclass
class Check:
    id: str
    service_id: str
    name: str
    ttl: float | None = None
    deregister_after: float | None = None  # recorded; reaping dead entries is the real agent's job
    grpc: str | None = None
    grpc_tls: bool = False
    interval: float = 10.0
    status: str = "critical"
    output: str = ""
    updated: float = field(default_factory=time.monotonic)
    next_run: float = 0.0


def _listed_check(check: Check, service_name: str) -> dict:
    """A check as GET /v1/health/service/<name> lists it."""
    return {
        "Node": "standin",
        "CheckID": check.id,
        "Name": check.name,
        "Status": check.status,
        "Output": check.output,
        "ServiceID": check.service_id,
        "ServiceName": service_name,
    }


class ConsulStandIn:
    def __init__(self, certs_dir: Path) -> None:
        self._certs = Settings(certs_dir=certs_dir)
        self.services: dict[str, dict] = {}
        self.checks: dict[str, Check] = {}
        self.index = 1
        self.blocking_queries = 0  # served with an index (a real long-poll)
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.address = f"127.0.0.1:{self._server.server_address[1]}"

    # ------------------------------------------------------------------ state

    def _bump(self) -> None:
        with self._changed:
            self.index += 1
            self._changed.notify_all()

    def set_status(self, check_id: str, status: str, output: str = "") -> bool:
        item = self.checks.get(check_id)
        if item is None:
            return False
        item.updated = time.monotonic()
        if (item.status, item.output) != (status, output):
            item.status, item.output = status, output
            self._bump()
        return True

    def register(self, body: dict) -> None:
        service_id = _field(body, "id") or _field(body, "name")
        self.deregister(service_id, bump=False)
        self.services[service_id] = body
        for number, definition in enumerate(_field(body, "checks") or [], start=1):
            check_id = _field(definition, "check_id") or f"service:{service_id}:{number}"
            ttl, grpc_target = _field(definition, "ttl"), _field(definition, "grpc")
            deregister_after = _field(definition, "deregister_critical_service_after")
            self.checks[check_id] = Check(
                check_id,
                service_id,
                _field(definition, "name") or check_id,
                ttl=_duration(ttl) if ttl else None,
                deregister_after=_duration(deregister_after) if deregister_after else None,
                grpc=grpc_target,
                grpc_tls=bool(_field(definition, "grpc_use_tls")),
                interval=_duration(_field(definition, "interval") or "10s"),
            )
        self._bump()

    def deregister(self, service_id: str, bump: bool = True) -> bool:
        found = self.services.pop(service_id, None) is not None
        for check_id in [c.id for c in self.checks.values() if c.service_id == service_id]:
            del self.checks[check_id]
        if found and bump:
            self._bump()
        return found

    def healthy(self, name: str, passing: bool) -> list[dict]:
        out = []
        for service_id, body in list(self.services.items()):
            if _field(body, "name") != name:
                continue
            checks = [c for c in self.checks.values() if c.service_id == service_id]
            if passing and any(c.status != "passing" for c in checks):
                continue
            service = {
                "ID": service_id,
                "Service": name,
                "Tags": _field(body, "tags") or [],
                "Address": _field(body, "address") or "",
                "Port": _field(body, "port") or 0,
                "Meta": _field(body, "meta") or {},
            }
            node = {"Node": "standin", "Address": "127.0.0.1"}
            out.append({"Node": node, "Service": service, "Checks": [_listed_check(c, name) for c in checks]})
        return out

    def _run_checks(self) -> None:
        """The agent's side: gRPC checks run on their interval, TTL checks expire."""
        while not self._stop.wait(0.1):
            now = time.monotonic()
            for item in list(self.checks.values()):
                if item.ttl is not None and item.status != "critical" and now - item.updated > item.ttl:
                    self.set_status(item.id, "critical", "TTL expired")
                if item.grpc and now >= item.next_run:
                    item.next_run = now + item.interval
                    self.set_status(item.id, *self._grpc_check(item))

    def _grpc_check(self, item: Check) -> tuple[str, str]:
        if item.grpc_tls:
            channel = grpc.secure_channel(item.grpc, channel_credentials(self._certs, "consul"))
        else:
            channel = grpc.insecure_channel(item.grpc)
        with channel:
            serving = check(channel, timeout=2.0)
        return ("passing", "SERVING") if serving else ("critical", "not SERVING or unreachable")

    # ------------------------------------------------------------------ HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def _reply(self, status: int, body: object = None, index: int | None = None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if index is not None:
                    self.send_header("X-Consul-Index", str(index))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                path = urlparse(self.path).path
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                if path == "/v1/agent/service/register":
                    standin.register(body)
                    return self._reply(200)
                if match := re.fullmatch(r"/v1/agent/service/deregister/(.+)", path):
                    standin.deregister(match[1])
                    return self._reply(200)
                if match := re.fullmatch(r"/v1/agent/check/(pass|warn|fail)/(.+)", path):
                    note = parse_qs(urlparse(self.path).query).get("note", [""])[0]
                    status = {"pass": "passing", "warn": "warning", "fail": "critical"}[match[1]]
                    return self._reply(200 if standin.set_status(match[2], status, note) else 404)
                return self._reply(404)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                match = re.fullmatch(r"/v1/health/service/(.+)", url.path)
                if not match:
                    return self._reply(404)
                query = parse_qs(url.query, keep_blank_values=True)
                passing = "passing" in query and query["passing"][0] not in ("0", "false")
                if "index" in query:
                    standin.blocking_queries += 1
                    wanted = int(query["index"][0])
                    deadline = time.monotonic() + _duration(query.get("wait", ["300s"])[0])
                    with standin._changed:
                        while standin.index <= wanted and time.monotonic() < deadline:
                            standin._changed.wait(deadline - time.monotonic())
                return self._reply(200, standin.healthy(match[1], passing), standin.index)

        return Handler

    def __enter__(self) -> ConsulStandIn:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        threading.Thread(target=self._run_checks, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()
