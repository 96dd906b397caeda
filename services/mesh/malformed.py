"""Malformed request bytes are the caller's error: INVALID_ARGUMENT naming the message type,
instead of grpc's INTERNAL "Exception deserializing request!"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from services.mesh.handlers import Behavior, UnaryRequestInterceptor, wrap_behavior


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

        def guard(behavior: Behavior) -> Behavior:
            def checked(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Malformed):
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"malformed request to {details.method}: {request.reason}"
                    )
                return behavior(request, context)

            return checked

        return wrap_behavior(handler, guard, request_deserializer=_lenient(handler.request_deserializer))
