"""Score the requests that reach the model in one event-loop turn with one batch call.

A scikit-learn model pays a fixed cost per call (input checks, dataframe detection)
that dwarfs the per-record work for small requests. Concurrent small requests are
therefore merged into one ``score_batch`` call. There is no timer: the merge happens
at the end of the current loop turn, so a lone request is scored at once and nothing
waits for company.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

Records = list[dict[str, Any]]
ScoreBatch = Callable[[Records], Any]


class MicroBatcher:
    """Collects records of concurrent requests and scores them together."""

    def __init__(self, score_batch: ScoreBatch) -> None:
        self._score_batch = score_batch
        self._pending: list[tuple[Records, asyncio.Future[Records]]] = []
        self._scheduled = False

    def submit(self, records: Records) -> asyncio.Future[Records]:
        """Queue ``records``; the future resolves to their outputs, in order."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Records] = loop.create_future()
        self._pending.append((records, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        pending, self._pending, self._scheduled = self._pending, [], False
        if len(pending) == 1:
            self._settle(*pending[0])
            return
        merged = [record for records, _ in pending for record in records]
        try:
            outputs = self._checked(merged)
        except Exception:
            # One bad request must not fail its neighbours: score each on its own.
            for records, future in pending:
                self._settle(records, future)
            return
        start = 0
        for records, future in pending:
            future.set_result(outputs[start : start + len(records)])
            start += len(records)

    def _settle(self, records: Records, future: asyncio.Future[Records]) -> None:
        try:
            future.set_result(self._checked(records))
        except Exception as exc:
            future.set_exception(exc)

    def _checked(self, records: Records) -> Records:
        outputs = self._score_batch(records)
        if type(outputs) is not list or len(outputs) != len(records):
            raise TypeError(f"score_batch() must return a list of {len(records)} dicts")
        return outputs
