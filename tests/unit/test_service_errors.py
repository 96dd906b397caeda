"""Who is to blame for a failed call: the request (the service answered) or the instance (the
transport failed). Handlers run under the ServiceErrors interceptor on an event loop, as on every
mesh server, with a stand-in context."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
import pytest

from services.mesh.contracts.errors import InvalidArgument
from services.mesh.rpc.faults import CODE_METADATA_KEY, PARAM_METADATA_KEY, is_instance_fault
from services.mesh.rpc.service_errors import ServiceErrors


class Aborted(Exception):
    pass


class Context:
    """What a handler's grpc.aio.ServicerContext records of an abort."""

    def __init__(self) -> None:
        self.status: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: tuple = ()

    def code(self) -> grpc.StatusCode | None:
        return self.status

    def set_trailing_metadata(self, metadata: tuple) -> None:
        self.trailing = metadata

    async def abort(self, status: grpc.StatusCode, details: str) -> None:
        self.status, self.details = status, details
        raise Aborted


def _call(behavior, context: Context, streaming: bool = False) -> list:
    """Run `behavior` under ServiceErrors as a grpc.aio server would: its replies, as a list."""
    make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
    details = SimpleNamespace(method="/sluice.v1.Preprocess/RenderChat", invocation_metadata=())

    async def continuation(_: object) -> grpc.RpcMethodHandler:
        return make(behavior)

    async def run() -> list:
        wrapped = await ServiceErrors("preprocess").intercept_service(continuation, details)
        if streaming:
            return [reply async for reply in wrapped.unary_stream(None, context)]
        return [await wrapped.unary_unary(None, context)]

    return asyncio.run(run())


def test_a_mesh_error_becomes_its_status_with_code_and_param() -> None:
    async def invalid(request: object, context: Context) -> None:
        raise InvalidArgument("tools[0]: too deep", "tools[0]")

    context = Context()
    with pytest.raises(Aborted):
        _call(invalid, context)
    assert context.status == grpc.StatusCode.INVALID_ARGUMENT and context.details == "tools[0]: too deep"
    assert dict(context.trailing) == {CODE_METADATA_KEY: "invalid_value", PARAM_METADATA_KEY: "tools[0]"}


@pytest.mark.parametrize("streaming", [False, True])
def test_a_crash_is_internal_with_a_stable_message_and_no_exception_text(streaming: bool) -> None:
    async def crash(request: object, context: Context) -> AsyncIterator[int]:
        yield 1
        raise RecursionError("maximum recursion depth exceeded while calling a Python object")

    async def crash_unary(request: object, context: Context) -> int:
        raise RecursionError("maximum recursion depth exceeded while calling a Python object")

    context = Context()
    with pytest.raises(Aborted):
        _call(crash if streaming else crash_unary, context, streaming)
    assert context.status == grpc.StatusCode.INTERNAL
    assert context.details == "internal error in preprocess while handling this request"
    assert dict(context.trailing)[CODE_METADATA_KEY] == "internal_error"


def test_replies_pass_through_unchanged() -> None:
    async def answer(request: object, context: Context) -> str:
        return "reply"

    async def stream(request: object, context: Context) -> AsyncIterator[int]:
        for n in range(3):
            yield n

    assert _call(answer, Context()) == ["reply"]
    assert _call(stream, Context(), streaming=True) == [0, 1, 2]


def test_a_handler_that_aborted_itself_keeps_its_status() -> None:
    async def refuse(request: object, context: Context) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not you")

    context = Context()
    with pytest.raises(Aborted):
        _call(refuse, context)
    assert (context.status, context.trailing) == (grpc.StatusCode.PERMISSION_DENIED, ())


@pytest.mark.parametrize(
    ("status", "answered", "fault"),
    [
        (grpc.StatusCode.UNAVAILABLE, False, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, False, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True, True),  # an instance too slow to serve in time
        (grpc.StatusCode.UNKNOWN, False, True),  # "Stream removed": the connection broke
        (grpc.StatusCode.INTERNAL, False, True),
        (grpc.StatusCode.INTERNAL, True, False),  # the service crashed on this request
        (grpc.StatusCode.INVALID_ARGUMENT, True, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True, False),
        (grpc.StatusCode.CANCELLED, False, False),
    ],
)
def test_only_instance_faults_count_against_an_instance(status: grpc.StatusCode, answered: bool, fault: bool) -> None:
    trailing = grpc.aio.Metadata((CODE_METADATA_KEY, "x")) if answered else grpc.aio.Metadata()
    assert is_instance_fault(grpc.aio.AioRpcError(status, grpc.aio.Metadata(), trailing, details="d")) is fault
