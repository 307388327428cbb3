"""Push records through a streaming deployment and collect its answers (stage tests, bench).

The probe produces each record to a topic with a key unique to this probe, then reads
the output topic until every key has an answer or the timeout passes. Answers are
matched by key, not by order (partitions interleave, and at-least-once delivery may
repeat one); a dead letter (marked with the ``mlc-error`` header) is an answer too,
carrying the consumer's reason.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from mlc.streaming.consumer import HEADER_ERROR

Progress = Callable[[str], None]


@dataclass
class ProbeResult:
    """What came back for each record, in the records' order."""

    answers: list[Any]
    """The output object, ``"dead-lettered: REASON"``, or ``"no output within N s"``."""
    received: int = 0
    dead_lettered: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    """Seconds from the probe's produce to the output's arrival, per answered record."""


def stream_through(
    client: Mapping[str, str],
    input_topic: str,
    output_topic: str,
    records: Sequence[Any],
    *,
    timeout: float,
    progress: Progress | None = None,
) -> ProbeResult:
    """Produce ``records`` to ``input_topic`` and wait for their answers on ``output_topic``.

    Raises:
        KafkaException: producing failed or the output topic cannot be read (callers
            translate it with :func:`mlc.streaming.topics.kafka_errors`).
    """
    probe = uuid.uuid4().hex[:12]
    keys = {f"{probe}/{i}".encode(): i for i in range(len(records))}
    consumer = Consumer(
        {
            **client,
            "group.id": f"mlc-probe-{probe}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        metadata = consumer.list_topics(output_topic, timeout=10).topics.get(output_topic)
        if metadata is None or metadata.error is not None:
            raise KafkaException(metadata.error if metadata else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
        consumer.assign([TopicPartition(output_topic, p, OFFSET_BEGINNING) for p in metadata.partitions])
        started = time.monotonic()
        sent = _produce(client, input_topic, records, probe)
        answers: list[Any] = [None] * len(records)
        result = ProbeResult(answers=answers)
        deadline = started + timeout
        next_note = started
        while result.received < len(records) and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.2):
                if message.error() is not None:
                    continue
                index = keys.get(message.key() or b"")
                if index is None or answers[index] is not None:
                    continue  # another probe's record, or a repeat (at-least-once)
                result.received += 1
                result.latencies.append(time.monotonic() - sent[index])
                error = dict(message.headers() or []).get(HEADER_ERROR)
                if error is not None:
                    result.dead_lettered += 1
                    reason = error.decode(errors="replace") if isinstance(error, bytes) else str(error)
                    answers[index] = f"dead-lettered: {reason}"
                else:
                    answers[index] = _decode(message.value())
            if progress is not None and time.monotonic() >= next_note:
                progress(f"{result.received}/{len(records)} answers from {output_topic}")
                next_note = time.monotonic() + 1.0
        for index, answer in enumerate(answers):
            if answer is None:
                answers[index] = f"no output within {timeout:.0f} s"
        result.seconds = time.monotonic() - started
        return result
    finally:
        consumer.close()


def _produce(client: Mapping[str, str], topic: str, records: Sequence[Any], probe: str) -> list[float]:
    """Produce every record (acknowledged); return when each was handed to the producer."""
    producer = Producer({**client, "acks": "all", "linger.ms": 2})
    failures: list[KafkaError] = []

    def delivered(error: KafkaError | None, _: Any) -> None:
        if error is not None:
            failures.append(error)

    sent: list[float] = []
    for index, record in enumerate(records):
        value = record if isinstance(record, bytes) else orjson.dumps(record)
        while True:
            try:
                producer.produce(topic, value=value, key=f"{probe}/{index}".encode(), on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
        sent.append(time.monotonic())
        producer.poll(0)
    remaining = producer.flush(30)
    if failures or remaining:
        raise KafkaException(
            failures[0] if failures else KafkaError(KafkaError._TIMED_OUT, f"{remaining} unacknowledged")
        )
    return sent


def _decode(value: bytes | None) -> Any:
    try:
        return orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return f"not JSON: {(value or b'')[:100]!r}"
