"""API keys: created once by `sluice keys create`, stored only as salted hashes.

A key reads `sk-sluice-<id>-<secret>`: the id finds its record, the secret is checked against
a salted SHA-256 in constant time. Keys carry 256 random bits, so a fast hash is enough (a
slow KDF protects guessable passwords, not random keys). The edge re-reads the file when it
changes, so new and revoked keys take effect without a restart.

Changes hold an exclusive lock on a sidecar `<file>.lock` from reading the file to replacing
it, so `sluice keys create` run from several processes at once loses no key; the file is
replaced atomically, so the edge never reads half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Iterator
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
        fh.flush()
        os.fsync(fh.fileno())  # a key printed to its owner must survive a crash right after
    os.replace(temporary, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive use of the keys file between processes, for a read-modify-replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f"{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def create(path: Path, name: str, rpm: int = 0, tpm: int = 0, models: list[str] | None = None) -> tuple[str, KeyRecord]:
    """Add a key; returns the plain key (shown once, never stored) and its record."""
    with _locked(path):
        return _create(path, name, rpm, tpm, models or [])


def _create(path: Path, name: str, rpm: int, tpm: int, models: list[str]) -> tuple[str, KeyRecord]:
    content = load(path)
    if any(record.name == name for record in content.keys):
        raise ValueError(f"a key named {name!r} already exists in {path}")
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
    record = KeyRecord(
        name=name,
        id=key_id,
        salt=salt,
        sha256=_digest(salt, secret),
        rpm=rpm,
        tpm=tpm,
        models=models,
        created=int(time.time()),
    )
    content.keys.append(record)
    _save(path, content)
    return f"{PREFIX}{key_id}-{secret}", record


def revoke(path: Path, name: str) -> None:
    with _locked(path):
        content = load(path)
        kept = [record for record in content.keys if record.name != name]
        if len(kept) == len(content.keys):
            raise KeyError(f"no key named {name!r} in {path}")
        _save(path, KeyFile(keys=kept))


class KeyStore:
    """The keys file as the edge sees it, re-read when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._by_id: dict[str, KeyRecord] = {}

    def _refresh(self) -> None:
        try:
            stat = self._path.stat()
            # An atomic replace gives a new inode, even within one mtime tick.
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
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
