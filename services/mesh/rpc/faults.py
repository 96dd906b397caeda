"""Who is to blame for a failed call, as its caller sees it.

A status that carries the error-code metadata (put there by ServiceErrors) is the service's
answer about this request; one without it (UNAVAILABLE, a dropped connection) came from the
transport and says something about the instance. Only that kind, and deadlines, count toward
ejecting an instance.
"""

from __future__ import annotations

import grpc

PARAM_METADATA_KEY = "sluice-error-param"
CODE_METADATA_KEY = "sluice-error-code"

# An instance that cannot be reached or does not answer in time, whoever reports it.
UNRESPONSIVE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# What the transport reports when a connection breaks mid-call (e.g. "Stream removed"); a
# service's own crash on a request arrives as INTERNAL too, but with the error-code metadata.
BROKEN = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


def error_details(err: grpc.RpcError) -> tuple[str | None, str | None]:
    """(error code, param) a service attached to a failed call; (None, None) when the failure
    did not come from a service's answer."""
    values = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]
    return values.get(CODE_METADATA_KEY), values.get(PARAM_METADATA_KEY)


def is_instance_fault(err: grpc.RpcError) -> bool:
    """Does this failure say something about the instance (down, hung, unreachable) rather than
    about the request? Only those count toward ejecting it."""
    code = err.code()  # type: ignore[attr-defined]
    return code in UNRESPONSIVE or (code in BROKEN and error_details(err)[0] is None)
