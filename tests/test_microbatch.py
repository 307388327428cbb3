"""How the model server merges concurrent requests: caps, large requests, the scoring thread."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from mlc.errors import MLCError
from mlc.manifest import InputField
from mlc.serving.microbatch import BatchPolicy, MicroBatcher
from mlc.serving.validation import RecordValidator


class Recorder:
    """A score_batch that records each call's size and thread, optionally slow per record."""

    def __init__(self, seconds_per_record: float = 0.0) -> None:
        self.calls: list[int] = []
        self.threads: list[str] = []
        self.seconds_per_record = seconds_per_record

    def __call__(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.calls.append(len(records))
        self.threads.append(threading.current_thread().name)
        if self.seconds_per_record:
            time.sleep(self.seconds_per_record * len(records))
        return [{"double": 2 * r["x"]} for r in records]


def requests(sizes: list[int]) -> list[list[dict[str, Any]]]:
    start = 0
    out = []
    for size in sizes:
        out.append([{"x": start + i} for i in range(size)])
        start += size
    return out


async def submit_all(batcher: MicroBatcher, batches: list[list[dict[str, Any]]]) -> list[Any]:
    """Submit every batch in one loop turn (as concurrent requests arrive) and await them."""
    futures = [batcher.submit(b) for b in batches]
    return list(await asyncio.gather(*futures))


async def test_small_concurrent_requests_merge_within_the_record_cap() -> None:
    model = Recorder()
    batcher = MicroBatcher(model, BatchPolicy(max_batch_records=7, large_request_records=100))
    batches = requests([3] * 10)
    results = await submit_all(batcher, batches)
    assert results == [[{"double": 2 * r["x"]} for r in b] for b in batches]
    assert sum(model.calls) == 30
    assert max(model.calls) <= 7
    assert max(model.calls) == 6, f"two 3-record requests share a call: {model.calls}"


async def test_a_large_request_is_never_merged() -> None:
    model = Recorder()
    batcher = MicroBatcher(model, BatchPolicy(max_batch_records=1000, large_request_records=50))
    batches = requests([1, 1, 60, 1, 1])
    results = await submit_all(batcher, batches)
    assert [len(r) for r in results] == [1, 1, 60, 1, 1]
    assert model.calls == [2, 60, 2], "the 60-record request scores alone, in its place in the queue"


async def test_the_time_cap_shrinks_merges_of_a_slow_model() -> None:
    # 1 ms per record against a 5 ms cap: after one overrun, no call may hold more than 5.
    model = Recorder(seconds_per_record=0.001)
    policy = BatchPolicy(max_batch_records=1000, max_delay_ms=5, large_request_records=100)
    batcher = MicroBatcher(model, policy)
    await submit_all(batcher, requests([20]))
    assert batcher.merge_limit() <= 5
    await submit_all(batcher, requests([1] * 30))
    assert sum(model.calls[1:]) == 30
    assert max(model.calls[1:]) <= 5, model.calls


async def test_quick_calls_let_the_time_cap_grow_back() -> None:
    model = Recorder()
    policy = BatchPolicy(max_batch_records=64, max_delay_ms=5, large_request_records=100)
    batcher = MicroBatcher(model, policy)
    batcher._learn(1.0, 10)  # one very slow call (a pause, say) shrinks the cap to nothing
    assert batcher.merge_limit() == 1
    batcher._learn(0.000_1, 10)  # the next quick call restores it
    assert batcher.merge_limit() == 64


async def test_big_requests_score_in_the_scoring_thread() -> None:
    model = Recorder()
    batcher = MicroBatcher(model, BatchPolicy(thread_records=10))
    try:
        await submit_all(batcher, requests([10, 2]))
    finally:
        batcher.close()
    by_size = dict(zip(model.calls, model.threads, strict=True))
    assert by_size[10].startswith("mlc-score")
    assert by_size[2] == threading.current_thread().name


async def test_a_failing_request_does_not_fail_its_merged_neighbours() -> None:
    def model(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if any(r["x"] < 0 for r in records):
            raise ValueError("x must be positive")
        return [{"x": r["x"]} for r in records]

    batcher = MicroBatcher(model)
    futures = [batcher.submit([{"x": 1}]), batcher.submit([{"x": -1}]), batcher.submit([{"x": 2}])]
    done = await asyncio.gather(*futures, return_exceptions=True)
    assert done[0] == [{"x": 1}] and done[2] == [{"x": 2}]
    assert isinstance(done[1], ValueError)


async def test_a_cancelled_request_is_skipped() -> None:
    model = Recorder()
    batcher = MicroBatcher(model)
    gone = batcher.submit([{"x": 1}])
    kept = batcher.submit([{"x": 2}])
    gone.cancel()
    assert await kept == [{"double": 4}]


def test_policy_from_env_names_a_bad_variable() -> None:
    policy = BatchPolicy.from_env({"MLC_SERVING_MAX_BATCH_RECORDS": "64", "MLC_SERVING_MAX_DELAY_MS": "0.5"})
    assert policy.max_batch_records == 64 and policy.max_delay_ms == 0.5
    with pytest.raises(MLCError, match="MLC_SERVING_LARGE_REQUEST_RECORDS"):
        BatchPolicy.from_env({"MLC_SERVING_LARGE_REQUEST_RECORDS": "-3"})


def test_validator_shape_cache_still_reports_bad_records() -> None:
    validator = RecordValidator(
        [InputField(name="x", type="number"), InputField(name="note", type="string", required=False)]
    )
    assert validator.problems([{"x": 1.5}, {"x": 2, "note": None}]) == []
    assert validator.problems([{"x": 1.5}]) == []  # now from the cache
    problems = validator.problems([{"x": 1.5}, {"x": True}])
    assert [p["problem"] for p in problems] == ["expected number, got boolean"]
    assert [p["field"] for p in validator.problems([{"x": 1.0, "y": 1}])] == ["y"]
    assert [p["field"] for p in validator.problems([{"note": "a"}])] == ["x"]


def test_validator_column_check_of_batches_finds_what_the_record_check_finds() -> None:
    """Batches big enough for the by-column check: every kind of bad record is still reported
    (with its index), and well-formed ones, optional fields null or absent, still pass."""
    schema = [
        InputField(name="x", type="number"),
        InputField(name="n", type="integer"),
        InputField(name="note", type="string", required=False),
    ]
    good = [{"x": float(i), "n": i, "note": "a" if i % 2 else None} for i in range(40)]
    assert RecordValidator(schema).problems(good) == []
    mixed_numbers = [{**r, "x": i} for i, r in enumerate(good)]  # ints are numbers too
    assert RecordValidator(schema).problems(mixed_numbers) == []
    without_note = [{"x": 1.0, "n": 1}] * 20 + good
    assert RecordValidator(schema).problems(without_note) == []

    def first_problem(records: list[Any]) -> tuple[int, str | None, str]:
        problems = RecordValidator(schema).problems(records)
        assert len(problems) == 1, problems
        return problems[0]["record"], problems[0]["field"], problems[0]["problem"]

    def with_record(index: int, record: Any) -> list[Any]:
        return [*good[:index], record, *good[index + 1 :]]

    assert first_problem(with_record(7, {"x": True, "n": 1, "note": None})) == (
        7,
        "x",
        "expected number, got boolean",
    )
    assert first_problem(with_record(30, {"x": 1.0, "n": 1.0, "note": None})) == (
        30,
        "n",
        "expected integer, got number",
    )
    assert first_problem(with_record(3, {"x": None, "n": 1, "note": None})) == (
        3,
        "x",
        "expected number, got null",
    )
    # Same number of fields as the schema, but one unknown in place of a known one.
    assert first_problem(with_record(12, {"x": 1.0, "n": 1, "other": "a"})) == (
        12,
        "other",
        "unknown field (not in the input schema)",
    )
    assert first_problem(with_record(5, {"x": 1.0, "n": 1, "note": None, "other": 2})) == (
        5,
        "other",
        "unknown field (not in the input schema)",
    )
    assert first_problem(with_record(20, {"x": 1.0, "note": None})) == (20, "n", "required field is missing")
    assert first_problem(with_record(39, ["x", 1.0])) == (39, None, "expected an object, got array")
