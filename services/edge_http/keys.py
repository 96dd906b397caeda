"""API keys: created once by `sluice keys create`, stored only as salted hashes.

A key reads `sk-sluice-<id>-<secret>`: the id finds its record, the secret is checked against
a salted SHA-256 in constant time. Keys carry 256 random bits, so a fast hash is enough (a
slow KDF protects guessable passwords, not random keys). The edge re-reads the file when it
changes, so new and revoked keys take effect without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from pydantic import BaseModel, Field

PREFIX = "sk-sluice-"


class KeyRecord(BaseModel):
    name: str
    id: str
    salt: str
    sha256: str
    rpm: int = Field(0, ge=0, description="requests per minute (0: unlimited)")
    tpm: int = Field(0, ge=0, description="tokens per minute, prompt + completion (0: unlimited)")
    models: list[str] = Field(default_factory=list, description="models this key may use (empty: all)")
    created: int = 0

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models


class KeyFile(BaseModel):
    keys: list[KeyRecord] = Field(default_factory=list)


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def load(path: Path) -> KeyFile:
    return KeyFile.model_validate_json(path.read_text()) if path.exists() else KeyFile()


def _save(path: Path, content: KeyFile) -> None:
    """Write atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(content.model_dump_json(indent=2))
    os.replace(temporary, path)


def create(path: Path, name: str, rpm: int = 0, tpm: int = 0, models: list[str] | None = None) -> tuple[str, KeyRecord]:
    """Add a key; returns the plain key (shown once, never stored) and its record."""
    content = load(path)
    if any(record.name == name for record in content.keys):
        raise ValueError(f"a key named {name!r} already exists in {path}")
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
    record = KeyRecord(
        name=name, id=key_id, salt=salt, sha256=_digest(salt, secret), rpm=rpm, tpm=tpm,
        models=models or [], created=int(time.time()),
    )  # fmt: skip
    content.keys.append(record)
    _save(path, content)
    return f"{PREFIX}{key_id}-{secret}", record


def revoke(path: Path, name: str) -> None:
    content = load(path)
    kept = [record for record in content.keys if record.name != name]
    if len(kept) == len(content.keys):
        raise KeyError(f"no key named {name!r} in {path}")
    _save(path, KeyFile(keys=kept))


class KeyStore:
    """The keys file as the edge sees it, re-read when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: int | None = None
        self._by_id: dict[str, KeyRecord] = {}

    def _refresh(self) -> None:
        try:
            stamp = self._path.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._by_id = {record.id: record for record in load(self._path).keys}
            self._stamp = stamp

    def verify(self, presented: str) -> KeyRecord | None:
        self._refresh()
        if not presented.startswith(PREFIX):
            return None
        key_id, _, secret = presented.removeprefix(PREFIX).partition("-")
        record = self._by_id.get(key_id)
        if record is None or not hmac.compare_digest(record.sha256, _digest(record.salt, secret)):
            return None
        return record
