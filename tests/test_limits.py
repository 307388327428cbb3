"""Token-bucket arithmetic of server/limits.py (the HTTP-level 429/413 are in test_api_auth.py)."""

from __future__ import annotations

import pytest

from server.errors import ApiError
from server.limits import Rate, RateLimits, TokenBuckets


class Clock:
    """Time the test advances, so bucket arithmetic is exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_grants_its_burst_then_its_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(Rate(per_second=5, burst=20), clock=clock)
    assert [buckets.take("alice") for _ in range(20)] == [0.0] * 20
    assert buckets.take("alice") == pytest.approx(0.2)
    assert buckets.take("bob") == 0.0  # per key
    clock.now += 0.2
    assert buckets.take("alice") == 0.0
    assert buckets.take("alice") == pytest.approx(0.2)
    clock.now += 3600
    assert [buckets.take("alice") for _ in range(21)][-2:] == [0.0, pytest.approx(0.2)]  # never above burst


def test_reads_writes_and_failures_are_separate_buckets() -> None:
    clock = Clock()
    limits = RateLimits(reads=Rate(50, 2), writes=Rate(5, 1), failures=Rate(10, 2), clock=clock)
    limits.charge("alice", "GET")
    limits.charge("alice", "POST")
    with pytest.raises(ApiError) as caught:
        limits.charge("alice", "PUT")
    assert (caught.value.status, caught.value.headers) == (429, {"Retry-After": "1"})
    assert "writes by alice" in caught.value.error
    limits.charge("alice", "HEAD")

    limits.before_authentication("127.0.0.2")
    limits.authentication_failed("127.0.0.2")
    limits.authentication_failed("127.0.0.2")
    with pytest.raises(ApiError, match="failed authentications"):
        limits.before_authentication("127.0.0.2")
    limits.before_authentication("127.0.0.3")
    clock.now += 0.1
    limits.before_authentication("127.0.0.2")
