"""Interceptors wrap a grpc.aio handler in a wrapper of its own kind: grpc serves an async
generator's yielded replies, awaits a coroutine (whose stream, if any, it wrote with
context.write), and would run anything else on a thread. A guard checks before any of them runs."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator

import grpc
import pytest

from services.mesh.rpc.handlers import guard_behavior


class Refused(Exception):
    pass


class Context:
    def __init__(self) -> None:
        self.written: list[int] = []
        self.reached = False  # the handler itself ran

    async def write(self, message: int) -> None:
        self.written.append(message)


async def doubled(request: int, context: Context) -> int:
    context.reached = True
    return request * 2


async def yielded(request: int, context: Context) -> AsyncIterator[int]:
    context.reached = True
    for n in range(request):
        yield n


async def written(request: int, context: Context) -> None:
    context.reached = True
    for n in range(request):
        await context.write(n)


async def check(request: int, context: Context) -> None:
    if request < 0:
        raise Refused  # as context.abort raises


def test_each_kind_is_wrapped_in_its_own_kind_and_answers_unchanged() -> None:
    unary = guard_behavior(grpc.unary_unary_rpc_method_handler(doubled), check).unary_unary
    generator = guard_behavior(grpc.unary_stream_rpc_method_handler(yielded), check).unary_stream
    writer = guard_behavior(grpc.unary_stream_rpc_method_handler(written), check).unary_stream
    assert inspect.iscoroutinefunction(unary) and inspect.iscoroutinefunction(writer)
    assert inspect.isasyncgenfunction(generator)

    async def run() -> tuple[int, list[int], list[int]]:
        context = Context()
        await writer(3, context)
        return await unary(3, Context()), [n async for n in generator(3, Context())], context.written

    assert asyncio.run(run()) == (6, [0, 1, 2], [0, 1, 2])


@pytest.mark.parametrize("behavior", [doubled, yielded, written])
def test_a_refused_call_never_reaches_its_handler(behavior) -> None:
    make = grpc.unary_unary_rpc_method_handler if behavior is doubled else grpc.unary_stream_rpc_method_handler
    handler = guard_behavior(make(behavior), check)
    wrapped = handler.unary_stream or handler.unary_unary
    context = Context()

    async def run() -> None:
        if inspect.isasyncgenfunction(wrapped):
            _ = [n async for n in wrapped(-1, context)]
        else:
            await wrapped(-1, context)

    with pytest.raises(Refused):
        asyncio.run(run())
    assert not context.reached
