"""Score concurrent small requests with one ``score_batch`` call, without growing the tail.

A scikit-learn model pays a fixed cost per call (input checks, dataframe detection)
that dwarfs the per-record work for small requests, so merging concurrent requests into
one ``score_batch`` call multiplies throughput. Merging has a price: every request in a
merged call waits for all of its records. Left unbounded (the first version merged
everything that arrived in one event-loop turn), eight concurrent 100-record requests
became one 800-record call and the p99 grew to several times the best peer's. So:

* a merged call is capped by records (``max_batch_records``) and by time
  (``max_delay_ms``: a call that overran it shrinks the cap to the records that would
  have fitted at the rate it measured; quick calls let it grow back), so one request
  never waits long for the others' records, whatever the model's speed;
* a request that is already large (``large_request_records``) is never merged: it
  amortises the per-call cost on its own, and merging it would only add its records to
  every neighbour's wait;
* the queue is drained one call per event-loop iteration, so the responses of one call
  are written, and new requests read, before the next call starts;
* requests of ``thread_records`` or more are scored in one scoring thread, off the event
  loop, so ``/health`` and small requests keep moving while a big array scores.

There is no timer: a lone request is scored at once and nothing waits for company.
The knobs come from ``MLC_SERVING_*`` variables (:meth:`BatchPolicy.from_env`) so a
runtime can tune each deployment through its environment.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mlc.errors import MLCError

Records = list[dict[str, Any]]
ScoreBatch = Callable[[Records], Any]

MAX_BATCH_RECORDS_ENV = "MLC_SERVING_MAX_BATCH_RECORDS"
MAX_DELAY_MS_ENV = "MLC_SERVING_MAX_DELAY_MS"
LARGE_REQUEST_RECORDS_ENV = "MLC_SERVING_LARGE_REQUEST_RECORDS"
THREAD_RECORDS_ENV = "MLC_SERVING_THREAD_RECORDS"
BATCHING_ENVS = (MAX_BATCH_RECORDS_ENV, MAX_DELAY_MS_ENV, LARGE_REQUEST_RECORDS_ENV, THREAD_RECORDS_ENV)
"""Every variable :meth:`BatchPolicy.from_env` reads (runtimes pass these through)."""


@dataclass(frozen=True)
class BatchPolicy:
    """How far the server may merge concurrent requests (defaults measured in bench_scoring.py)."""

    max_batch_records: int = 1024
    """At most this many records in one merged call."""
    max_delay_ms: float = 2.0
    """A merged call is kept to about this long, judged by how long the last calls took."""
    large_request_records: int = 256
    """Requests of at least this many records are scored on their own, never merged."""
    thread_records: int = 1024
    """Requests of at least this many records are scored in the scoring thread, off the loop."""

    def __post_init__(self) -> None:
        for name in ("max_batch_records", "max_delay_ms", "large_request_records", "thread_records"):
            if not getattr(self, name) > 0:
                raise MLCError(f"batch policy: {name} must be positive, got {getattr(self, name)!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BatchPolicy:
        """Defaults, overridden by the ``MLC_SERVING_*`` batching variables that are set.

        Raises:
            MLCError: a variable is not a positive number (naming it).
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field, name, kind in (
            ("max_batch_records", MAX_BATCH_RECORDS_ENV, int),
            ("max_delay_ms", MAX_DELAY_MS_ENV, float),
            ("large_request_records", LARGE_REQUEST_RECORDS_ENV, int),
            ("thread_records", THREAD_RECORDS_ENV, int),
        ):
            raw = env.get(name, "").strip()
            if not raw:
                continue
            try:
                value = kind(raw)
            except ValueError:
                value = 0
            if not value > 0:
                raise MLCError(f"{name}={raw!r} is not a positive number; unset it or give one")
            values[field] = value
        return cls(**values)


class MicroBatcher:
    """Queues the records of concurrent requests and scores them in bounded merged calls."""

    def __init__(self, score_batch: ScoreBatch, policy: BatchPolicy | None = None) -> None:
        self._score_batch = score_batch
        self._policy = policy or BatchPolicy()
        self._queue: deque[tuple[Records, asyncio.Future[Records]]] = deque()
        self._scheduled = False
        self._time_cap = self._policy.max_batch_records
        """Records a call is expected to score within ``max_delay_ms`` (see :meth:`_learn`)."""
        self._thread: ThreadPoolExecutor | None = None

    @property
    def policy(self) -> BatchPolicy:
        """The limits this batcher merges under."""
        return self._policy

    def submit(self, records: Records) -> asyncio.Future[Records]:
        """Queue ``records``; the future resolves to their outputs, in order.

        The future raises what ``score_batch`` raised, or ``TypeError`` when it did not
        return one output per record.
        """
        loop = asyncio.get_running_loop()
        if len(records) >= self._policy.thread_records:
            return loop.run_in_executor(self._scoring_thread(), self._checked, records)
        future: asyncio.Future[Records] = loop.create_future()
        self._queue.append((records, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._step)
        return future

    def merge_limit(self) -> int:
        """Most records the next merged call may hold: the record cap or the time cap."""
        return min(self._policy.max_batch_records, self._time_cap)

    def close(self) -> None:
        """Stop the scoring thread once its current call ends (for servers that shut down)."""
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
            self._thread = None

    def _scoring_thread(self) -> ThreadPoolExecutor:
        # One thread: big requests queue behind each other instead of fighting over the GIL.
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlc-score")
        return self._thread

    def _step(self) -> None:
        """Score the head of the queue (merged with what may join it), then yield to the loop."""
        queue = self._queue
        group = [queue.popleft()]
        total = len(group[0][0])
        large = self._policy.large_request_records
        if total < large:
            limit = self.merge_limit()
            while queue:
                size = len(queue[0][0])
                if size >= large or total + size > limit:
                    break
                group.append(queue.popleft())
                total += size
        started = time.perf_counter()
        if len(group) == 1:
            self._settle(*group[0])
        else:
            self._score_merged(group, total)
        self._learn(time.perf_counter() - started, total)
        if queue:
            asyncio.get_running_loop().call_soon(self._step)
        else:
            self._scheduled = False

    def _score_merged(self, group: list[tuple[Records, asyncio.Future[Records]]], total: int) -> None:
        merged = [record for records, _ in group for record in records]
        try:
            outputs = self._checked(merged)
        except Exception:
            # One bad request must not fail its neighbours: score each on its own.
            for records, future in group:
                self._settle(records, future)
            return
        start = 0
        for records, future in group:
            if not future.done():  # a client that went away cancels its future
                future.set_result(outputs[start : start + len(records)])
            start += len(records)

    def _settle(self, records: Records, future: asyncio.Future[Records]) -> None:
        if future.done():
            return
        try:
            future.set_result(self._checked(records))
        except Exception as exc:
            future.set_exception(exc)

    def _learn(self, seconds: float, records: int) -> None:
        """Move the time cap after a call of ``records`` that took ``seconds``.

        ``records * delay / seconds`` is what would fit in the delay at this call's rate.
        It underestimates (the per-call overhead is counted as if per record), which errs
        on the short side: an overrun shrinks the cap to it at once, and a quick call only
        ever raises the cap, so small cheap calls never hold back merging.
        """
        delay = self._policy.max_delay_ms / 1000
        fits = int(records * delay / seconds) if seconds > 0 else self._policy.max_batch_records
        if seconds > delay:
            self._time_cap = max(1, fits)
        else:
            self._time_cap = min(self._policy.max_batch_records, max(self._time_cap, fits))

    def _checked(self, records: Records) -> Records:
        outputs = self._score_batch(records)
        if type(outputs) is not list or len(outputs) != len(records):
            raise TypeError(f"score_batch() must return a list of {len(records)} dicts")
        return outputs
