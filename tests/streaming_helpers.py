"""Helpers for streaming tests: runtimes on the session's broker, producing and reading topics."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from mlc.domain import Mode, Runtime
from mlc.kafka_settings import KafkaSettings


def streaming_runtime(
    bootstrap: str,
    *,
    name: str = "local-stream",
    stage: str = "UAT",
    tags: tuple[str, ...] = ("*",),
    instances: int = 1,
    partitions: int = 3,
    task_queue: str = "mlc",
    **extra: Any,
) -> Runtime:
    """A local streaming runtime on fresh topics (the broker is shared by the session)."""
    topic = f"t{uuid.uuid4().hex[:8]}"
    return Runtime(
        name=name,
        stage=stage,
        service_tags=tags,
        modes=(Mode.STREAMING,),
        task_queue=task_queue,
        kafka=KafkaSettings(
            bootstrap_servers=bootstrap,
            input_topic=f"{topic}.in",
            output_topic=f"{topic}.out",
            instances=instances,
            partitions=partitions,
            test_timeout_seconds=30,
        ),
        **extra,
    )


@dataclass
class Received:
    """One record read back from a topic."""

    key: str
    value: Any
    headers: dict[str, str]
    partition: int
    offset: int


def produce(bootstrap: str, topic: str, records: Iterable[tuple[str, Any]]) -> dict[str, int]:
    """Produce (key, value) pairs, acknowledged; return key -> partition."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 2})
    placed: dict[str, int] = {}

    def delivered(error: Any, message: Any) -> None:
        assert error is None, error
        placed[message.key().decode()] = message.partition()

    for key, value in records:
        data = value if isinstance(value, bytes) else orjson.dumps(value)
        producer.produce(topic, key=key.encode(), value=data, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(30) == 0
    return placed


@dataclass
class SteadyProducer:
    """Produces ``count`` records ``{"id": i, "x": i}`` with key ``str(i)`` over ``seconds``."""

    bootstrap: str
    topic: str
    count: int
    seconds: float
    placed: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SteadyProducer:
        self._thread.start()
        return self

    def join(self, timeout: float = 60) -> dict[str, int]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "producer did not finish"
        assert len(self.placed) == self.count
        return self.placed

    def _run(self) -> None:
        batches = 50
        per = self.count // batches
        for b in range(batches):
            chunk = range(b * per, self.count if b == batches - 1 else (b + 1) * per)
            self.placed.update(
                produce(self.bootstrap, self.topic, ((str(i), {"id": i, "x": i}) for i in chunk))
            )
            time.sleep(self.seconds / batches)


def read_topic(bootstrap: str, topic: str, *, until: int, timeout: float = 60) -> list[Received]:
    """Every record of ``topic`` from the start, once at least ``until`` have arrived (or timeout)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions])
        found: list[Received] = []
        deadline = time.monotonic() + timeout
        while len(found) < until and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.2):
                if m.error() is None:
                    found.append(
                        Received(
                            key=(m.key() or b"").decode(),
                            value=_decode(m.value()),
                            headers={k: (v or b"").decode() for k, v in (m.headers() or [])},
                            partition=m.partition(),
                            offset=m.offset(),
                        )
                    )
        return found
    finally:
        consumer.close()


def _decode(value: bytes | None) -> Any:
    try:
        return orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return value
