"""What the core knows about the call a request came in, whichever front end took it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# Where a caller pins a model version, and where the answer names the version that served it
# (an HTTP header; gRPC metadata under the same name).
VERSION_HEADER = "X-Sluice-Model-Version"


@dataclass
class RequestRecord:
    """What the edge learns about a request while serving it, for its metrics and audit line."""

    request_id: str
    key_name: str = ""  # the caller's API key, once authenticated
    subject: str = ""  # who the caller is: the key's name, or a token's `sub`
    role: str = ""  # the role whose permissions and limits the caller has, if any
    credential_id: str = ""  # which credential: the key's id, or the token's `jti`
    model: str = ""  # a model known to exist (never raw client input): a metrics label
    model_version: str = ""  # the version of the model that served it
    tokens: int | None = None  # prompt + completion tokens charged, once settled


@dataclass(frozen=True)
class RequestContext:
    """A request's id and audit record, and what its caller asked of the mesh beside the body."""

    record: RequestRecord
    no_cache: bool = False  # the caller asked for a fresh answer (Cache-Control: no-cache)
    pinned_version: str | None = None  # the model version the caller pinned, if any
    started: float = field(default_factory=time.perf_counter)

    @property
    def request_id(self) -> str:
        return self.record.request_id
