"""The streaming consumer's commit order: offsets are committed only for batches whose
outputs, and every earlier batch's, are acknowledged; a failure rewinds to before every
batch it takes along (at-least-once with batches in flight, mlc/streaming/inflight.py)."""

from __future__ import annotations

from confluent_kafka import KafkaError, Message

from mlc.streaming.inflight import Batch, InFlight


def polled(*positions: tuple[int, int]) -> Batch:
    """A sealed batch of records at (partition, offset) of topic ``in``, with one output each."""
    batch = Batch.of([Message(topic="in", partition=p, offset=o) for p, o in positions])
    for _ in positions:
        batch.expect()
    batch.sealed = True
    return batch


def acknowledge(batch: Batch, error: KafkaError | None = None) -> None:
    for _ in range(batch.outstanding):
        batch.delivered(error, Message(topic="out", partition=0, offset=0))


def test_a_batch_records_where_it_starts_and_what_to_commit_per_partition() -> None:
    batch = polled((0, 7), (1, 3), (0, 5), (0, 6), (1, 4))
    assert batch.starts == {("in", 0): 5, ("in", 1): 3}
    assert batch.ends == {("in", 0): 8, ("in", 1): 5}


def test_nothing_is_committed_past_a_batch_still_in_flight() -> None:
    inflight = InFlight()
    first, second = polled((0, 0), (0, 1)), polled((0, 2), (1, 0))
    inflight.add(first)
    inflight.add(second)
    acknowledge(second)
    done = inflight.settle()
    assert done.commit == {} and done.failure is None and len(inflight) == 2
    acknowledge(first)
    done = inflight.settle()
    assert done.commit == {("in", 0): 3, ("in", 1): 1}
    assert done.batches == 2 and len(inflight) == 0


def test_an_unsealed_batch_is_not_settled_even_with_nothing_outstanding() -> None:
    inflight = InFlight()
    batch = Batch.of([Message(topic="in", partition=0, offset=0)])
    inflight.add(batch)
    assert inflight.settle().commit == {}
    batch.sealed = True
    assert inflight.settle().commit == {("in", 0): 1}


def test_a_failed_delivery_rewinds_it_and_every_later_batch_and_commits_only_earlier_ones() -> None:
    inflight = InFlight()
    ok, failed, later = polled((0, 0), (0, 1)), polled((0, 2), (1, 5)), polled((1, 6), (2, 9))
    for batch in (ok, failed, later):
        inflight.add(batch)
    acknowledge(ok)
    acknowledge(later)
    acknowledge(failed, KafkaError(KafkaError._MSG_TIMED_OUT))
    done = inflight.settle()
    assert done.commit == {("in", 0): 2}
    assert done.rewind == {("in", 0): 2, ("in", 1): 5, ("in", 2): 9}
    assert done.failure is not None and "out" in done.failure
    assert done.batches == 3 and len(inflight) == 0


def test_a_batch_given_up_on_settles_as_failed_even_if_its_outputs_arrive_later() -> None:
    inflight = InFlight()
    batch = polled((0, 4))
    inflight.add(batch)
    batch.fail("still unacknowledged after 30 s")
    done = inflight.settle()
    assert done.commit == {} and done.rewind == {("in", 0): 4}
    assert done.failure == "still unacknowledged after 30 s"
    acknowledge(batch)  # a late report of a dropped batch changes nothing
    assert inflight.settle().commit == {}
