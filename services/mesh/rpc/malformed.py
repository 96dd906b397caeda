"""Malformed request bytes are the caller's error: INVALID_ARGUMENT naming the message type,
instead of grpc's INTERNAL "Exception deserializing request!"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from services.mesh.rpc.handlers import UnaryRequestInterceptor, guard_behavior


@dataclass(frozen=True)
class _Malformed:
    reason: str


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as err:  # protobuf raises DecodeError, and others for some inputs
            return _Malformed(f"{type(err).__name__}: {err}")

    return parse


class RejectMalformed(UnaryRequestInterceptor):
    def intercept(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is None:
            return handler

        async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
            if isinstance(request, _Malformed):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"malformed request to {details.method}: {request.reason}"
                )

        return guard_behavior(handler, check, request_deserializer=_lenient(handler.request_deserializer))
