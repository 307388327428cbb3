"""Rate and body limits of the API, per server process (design §6).

Token buckets per principal, one for reads and one for writes, and one per client IP that
only failed authentications drain (it slows key and token probing without touching callers
who authenticate). A refusal is 429 with ``Retry-After``. Bodies are bounded by their
``Content-Length`` before anything is read, and by the bytes actually streamed (chunked
bodies carry no length): 413 either way.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.requests import Request

from server.errors import ApiError


@dataclass(frozen=True)
class Rate:
    """A sustained rate and the burst allowed on top of it."""

    per_second: float
    burst: int


READS = Rate(per_second=50, burst=100)
"""GET/HEAD per principal."""
WRITES = Rate(per_second=5, burst=20)
"""Every other method per principal."""
AUTH_FAILURES = Rate(per_second=10, burst=20)
"""Failed authentications per client IP."""
MAX_BUCKETS = 50_000
"""Buckets kept per kind; the least recently used beyond it are forgotten (they start full
again), so a flood of client addresses cannot grow the process without bound."""
READ_METHODS = frozenset({"GET", "HEAD"})


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class TokenBuckets:
    """One token bucket per key at one ``Rate``; the clock is injectable for tests of arithmetic."""

    def __init__(self, rate: Rate, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _refilled(self, key: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(self.rate.burst), now)
            self._buckets[key] = bucket
            if len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self.rate.burst, bucket.tokens + (now - bucket.stamp) * self.rate.per_second)
            bucket.stamp = now
        return bucket

    def wait(self, key: str) -> float:
        """Seconds until ``key`` has a whole token again (0 when it has one now); takes nothing."""
        bucket = self._refilled(key)
        return 0.0 if bucket.tokens >= 1 else (1 - bucket.tokens) / self.rate.per_second

    def take(self, key: str) -> float:
        """Take a token for ``key``: 0 when granted, else the seconds to wait (nothing taken)."""
        bucket = self._refilled(key)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate.per_second


def too_many(wait: float, what: str) -> ApiError:
    """429 whose ``Retry-After`` (whole seconds, at least 1) says when to come back."""
    seconds = max(1, math.ceil(wait))
    return ApiError(
        429,
        f"too many {what}: retry in {seconds} s (limits are per server process)",
        "rate-limited",
        headers={"Retry-After": str(seconds)},
    )


class RateLimits:
    """The server's buckets: reads and writes per principal, failed authentications per IP."""

    def __init__(
        self,
        *,
        reads: Rate = READS,
        writes: Rate = WRITES,
        failures: Rate = AUTH_FAILURES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reads = TokenBuckets(reads, clock=clock)
        self.writes = TokenBuckets(writes, clock=clock)
        self.failures = TokenBuckets(failures, clock=clock)

    def before_authentication(self, client_ip: str) -> None:
        """429 while ``client_ip`` has used up its failed authentications (checked before the
        signature or token is, so probing costs the prober time, not us CPU)."""
        wait = self.failures.wait(client_ip)
        if wait:
            raise too_many(wait, "failed authentications from this address")

    def authentication_failed(self, client_ip: str) -> None:
        """Count one failed authentication of ``client_ip``."""
        self.failures.take(client_ip)

    def charge(self, principal: str, method: str) -> None:
        """Take a read or write token of ``principal``, or 429."""
        read = method in READ_METHODS
        wait = (self.reads if read else self.writes).take(principal)
        if wait:
            raise too_many(wait, f"{'reads' if read else 'writes'} by {principal}")


def declared_length(request: Request, limit: int, setting: str | None = None) -> int | None:
    """The body's ``Content-Length`` (None if chunked), 413 past ``limit`` before reading a byte
    (``setting``: the variable that sets the limit, named in the refusal)."""
    text = request.headers.get("content-length")
    if text is None:
        return None
    if not text.isdigit() or len(text) > 19:
        raise ApiError(400, f"Content-Length {text[:40]!r} is not a byte count", "bad-request")
    length = int(text)
    if length > limit:
        raise body_too_large(limit, setting)
    return length


def body_too_large(limit: int, setting: str | None = None) -> ApiError:
    """413 naming the limit (and what sets it), so the caller knows what would pass."""
    where = f" ({setting})" if setting else ""
    return ApiError(
        413, f"the request body is larger than this route's limit of {limit} bytes{where}", "too-large"
    )


async def stream_body(request: Request, limit: int, setting: str | None = None) -> AsyncIterator[bytes]:
    """The body's chunks, 413 as soon as more than ``limit`` bytes arrived (for uploads)."""
    declared_length(request, limit, setting)
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise body_too_large(limit, setting)
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, bounded by ``limit`` (Content-Length first, then the bytes streamed)."""
    return b"".join([chunk async for chunk in stream_body(request, limit)])
