"""Cache keys: only deterministic requests get one, and it covers everything that shapes the output."""

from __future__ import annotations

import hashlib
import struct

from services.mesh.stubs import common_pb2

KEY_VERSION = b"sluice-cache-v1"


def is_deterministic(sampling: common_pb2.SamplingParams) -> bool:
    return sampling.temperature == 0.0 or sampling.HasField("seed")


def cache_key(model: str, token_ids: list[int], sampling: common_pb2.SamplingParams, variables: str = "") -> str:
    """sha256 of model, prompt tokens, every (resolved) sampling parameter and the chat template's
    variables (canonical JSON); "" when not cacheable."""
    if not is_deterministic(sampling):
        return ""
    digest = hashlib.sha256(KEY_VERSION)
    digest.update(model.encode() + b"\0")
    digest.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    digest.update(sampling.SerializeToString(deterministic=True))
    digest.update(variables.encode())
    return digest.hexdigest()
