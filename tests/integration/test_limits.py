"""Per-key limits: the token bucket logic, the same behaviour from the Redis script on a real
redis-server, settlement that gives unused tokens back, and the per-process fallback (with
one warning) when Redis is unreachable."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from redisproc import redis_server

from services.edge_http.core.limits import Bucket, Buckets, Limiter, LocalBuckets, RedisBuckets


def test_bucket_refills_at_its_per_minute_rate() -> None:
    bucket = Bucket(capacity=60, level=60, updated=0.0)
    assert bucket.take(60, now=0.0) == 0.0
    assert bucket.take(1, now=0.0) == pytest.approx(1.0)  # one unit per second
    assert bucket.take(10, now=4.0) == pytest.approx(6.0)  # 4 refilled, 6 more seconds for 10
    assert bucket.take(10, now=10.0) == 0.0
    assert bucket.take(-500, now=10.0) == 0.0  # giving back never overfills
    assert bucket.level == 60


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["local", "redis"])
def buckets(request: pytest.FixtureRequest, redis_url: str) -> Buckets:
    return LocalBuckets() if request.param == "local" else RedisBuckets(redis_url)


def test_requests_per_minute(buckets: Buckets) -> None:
    async def run() -> list:
        limiter = Limiter(buckets)
        return [await limiter.admit(f"rpm-{id(buckets)}", 3) for _ in range(4)]

    outcomes = asyncio.run(run())
    assert outcomes[:3] == [None, None, None]
    assert outcomes[3] is not None and outcomes[3].what == "requests" and outcomes[3].retry_after_s >= 1


def test_tokens_reserved_then_settled_with_real_usage(buckets: Buckets) -> None:
    key = f"tpm-{id(buckets)}"

    async def run() -> tuple:
        limiter = Limiter(buckets)
        first = await limiter.reserve(key, 100, 80)
        refused = await limiter.reserve(key, 100, 80)  # 20 left
        await limiter.settle(key, 100, 80, 10)  # the first used only 10: 70 come back
        second = await limiter.reserve(key, 100, 80)
        too_big = await limiter.reserve(key, 100, 101)
        unlimited = await limiter.reserve(key, 0, 10**9)
        return first, refused, second, too_big, unlimited

    first, refused, second, too_big, unlimited = asyncio.run(run())
    assert first is None and second is None and unlimited is None
    assert refused is not None and refused.what == "tokens" and refused.retry_after_s >= 1
    assert too_big is not None and too_big.retry_after_s == 60


def test_unreachable_redis_falls_back_to_local_buckets_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> list:
        limiter = Limiter(RedisBuckets("redis://127.0.0.1:1/0"))
        return [await limiter.admit("k", 2) for _ in range(3)]

    with caplog.at_level(logging.WARNING):
        outcomes = asyncio.run(run())
    assert outcomes[:2] == [None, None] and outcomes[2] is not None  # still limited, per process
    warnings = [r for r in caplog.records if "rate limits are per edge process" in r.getMessage()]
    assert len(warnings) == 1


def test_limits_in_redis_are_shared_between_clients(redis_url: str) -> None:
    async def run() -> list:
        edges = [Limiter(RedisBuckets(redis_url)), Limiter(RedisBuckets(redis_url))]
        return [await edges[i % 2].admit("shared-key", 4) for i in range(6)]

    outcomes = asyncio.run(run())
    assert [o is None for o in outcomes] == [True, True, True, True, False, False]
