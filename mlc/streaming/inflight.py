"""Batches whose outputs are on their way to the broker, committed in order once acknowledged.

Waiting for a batch's acknowledgements (a broker round trip with ``acks=all``) and then
committing synchronously (another) before polling again left the consumer idle for most of
each batch. So the next batch is polled and scored while the previous ones' outputs are in
flight, and offsets are committed as acknowledgements come back. At-least-once holds
because a batch's offsets are committed only when every output and dead letter of that
batch *and of every earlier batch of its lane* is acknowledged: :meth:`InFlight.settle`
releases batches strictly in the order they were polled. A batch with a failed delivery
is scored again together with every later batch still in flight, from the first offset
any of them holds per partition (duplicates, never loss).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

Position = tuple[str, int]
"""A topic and a partition."""


class Polled(Protocol):
    """What a batch needs of a consumed message (``confluent_kafka.Message``)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...


@dataclass
class Batch:
    """One poll's records: where they start and end per partition, and how many of their
    outputs are still unacknowledged."""

    starts: dict[Position, int]
    """The first offset per partition: where to rewind when the batch is scored again."""
    ends: dict[Position, int]
    """The offset to commit per partition (the last record's offset plus one)."""
    outstanding: int = 0
    sealed: bool = False
    """Every output has been handed to the producer; none is expected after."""
    failure: str | None = None

    @classmethod
    def of(cls, messages: Iterable[Polled]) -> Batch:
        starts: dict[Position, int] = {}
        ends: dict[Position, int] = {}
        for message in messages:
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            assert topic is not None and partition is not None and offset is not None
            key = (topic, partition)
            if key not in starts or offset < starts[key]:
                starts[key] = offset
            if offset + 1 > ends.get(key, -1):
                ends[key] = offset + 1
        return cls(starts, ends)

    def expect(self) -> None:
        """One more output is being handed to the producer."""
        self.outstanding += 1

    def delivered(self, error: Any, message: Any) -> None:
        """The producer's delivery report for one output (its ``on_delivery`` callback)."""
        self.outstanding -= 1
        if error is not None and self.failure is None:
            self.failure = f"{message.topic()}: {error}"

    def fail(self, reason: str) -> None:
        """Give up waiting: the batch is scored again even if its outputs arrive later."""
        if self.failure is None:
            self.failure = reason

    @property
    def settled(self) -> bool:
        return self.sealed and (self.outstanding == 0 or self.failure is not None)


@dataclass
class Settled:
    """What :meth:`InFlight.settle` released: offsets that may be committed, and, after a
    failure, where to rewind each partition so the failed batches are scored again."""

    commit: dict[Position, int] = field(default_factory=dict)
    rewind: dict[Position, int] = field(default_factory=dict)
    failure: str | None = None
    batches: int = 0
    """Batches released, failed ones included."""


class InFlight:
    """A lane's batches in the order they were polled."""

    def __init__(self) -> None:
        self._batches: deque[Batch] = deque()

    def __len__(self) -> int:
        return len(self._batches)

    def add(self, batch: Batch) -> None:
        self._batches.append(batch)

    def oldest(self) -> Batch | None:
        return self._batches[0] if self._batches else None

    def settle(self) -> Settled:
        """Release the settled batches at the front: acknowledged ones become offsets to
        commit; the first failed one takes every batch after it along, to be rewound."""
        done = Settled()
        while self._batches and self._batches[0].settled:
            batch = self._batches.popleft()
            done.batches += 1
            if batch.failure is None:
                for key, end in batch.ends.items():
                    done.commit[key] = max(done.commit.get(key, end), end)
                continue
            done.failure = batch.failure
            for dropped in (batch, *self._batches):
                for key, start in dropped.starts.items():
                    done.rewind[key] = min(done.rewind.get(key, start), start)
            done.batches += len(self._batches)
            self._batches.clear()
        return done
