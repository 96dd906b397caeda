"""Ready files: how a started service tells its supervisor where it listens.

A service binds its ports (possibly free ones), then writes one JSON object atomically;
the supervisor waits for the file instead of guessing ports or sleeping.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

_WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def advertised_address(bind_host: str, port: int) -> str:
    """host:port others should dial: a wildcard bind is reached (and certified) as 127.0.0.1."""
    host = "127.0.0.1" if bind_host in _WILDCARDS else bind_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class ReadyInfo:
    service: str
    address: str
    metrics: str
    pid: int


def write_ready(path: Path, info: ReadyInfo) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(asdict(info)))
    os.replace(tmp, path)


def read_ready(path: Path) -> ReadyInfo | None:
    try:
        return ReadyInfo(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
