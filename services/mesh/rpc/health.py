"""Client side of grpc.health.v1: ask a service whether it is SERVING."""

from __future__ import annotations

import time

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def check(channel: grpc.Channel, timeout: float = 2.0, service: str = "") -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    except grpc.RpcError:
        return False
    return reply.status == SERVING


async def check_async(channel: grpc.aio.Channel, timeout: float = 2.0, service: str = "") -> bool:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    except grpc.aio.AioRpcError:
        return False
    return reply.status == SERVING


def wait_serving(channel: grpc.Channel, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check(channel, timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
            return True
        time.sleep(interval)
    return False
