"""The streaming consumer: score what a poll returns, write each result, then commit.

One process (or container) per instance of a streaming deployment. It reads the input
topic in the deployment's consumer group, validates each record against the manifest's
input schema, scores the valid ones with one ``score_batch`` call per poll, and writes
each output to the output topic with the input's key and headers naming model, version
and deployment. A record that is not JSON, fails the schema or makes the model raise
goes to the dead-letter topic with the reason, and the stream goes on.

Delivery is at-least-once: offsets are committed synchronously only after the producer
has every output and dead letter of the batch acknowledged (``acks=all``). A consumer
killed between the two leaves the batch uncommitted, so whoever takes its partitions
scores it again (duplicates, never loss). Because each batch is committed before the
next poll, a rebalance, which only happens inside a poll, never finds scored but
uncommitted records: a clean stop or a version switch neither loses nor repeats any.

The consumer also scores its deployment's own test topics (assigned directly, no group)
so stage tests never write to business topics; in ``standby`` it scores only those,
because another version still owns the input topic until this one is promoted.

The consumer must reach the broker, but model code must reach no network. So on a local
runtime (``--score-socket``) the consumer imports no model code at all: it reads only the
manifest (to validate records) and sends each batch to the deployment's model server,
which runs in a network namespace of its own, over its unix socket
(:class:`RemoteModel`). It also makes itself non-dumpable, so the model's processes
(the same user) cannot attach to it and borrow its network. In a container the network is
the container's and the model is loaded in-process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from confluent_kafka import (
    OFFSET_STORED,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from mlc.manifest import load_manifest
from mlc.serving.model_code import LoadedModel, load_model
from mlc.serving.validation import RecordValidator
from mlc.streaming.settings import StreamConfig, with_secret

STREAM_CONFIG_ENV = "MLC_STREAM_CONFIG"
"""The consumer's :class:`StreamConfig` as JSON (drivers set it; no file to mount)."""
READY_LINE = "mlc.streaming ready"
"""Printed once the model is loaded and the consumers exist; drivers wait for it."""

HEADER_MODEL = "mlc-model"
HEADER_VERSION = "mlc-version"
HEADER_DEPLOYMENT = "mlc-deployment"
HEADER_ERROR = "mlc-error"
"""On dead letters: why the record was not scored."""
HEADER_SOURCE = "mlc-source"
"""On dead letters: ``topic/partition/offset`` of the input record."""

DELIVERY_TIMEOUT_SECONDS = 30.0
"""How long one batch's outputs may take to be acknowledged before the batch is retried."""
RETRY_PAUSE_SECONDS = 1.0
FETCH_WAIT_MS = 20
POLL_WAIT_SECONDS = 0.05
"""How long a poll waits to fill a batch: the most batching adds to a record's latency."""
STATS_INTERVAL_SECONDS = 10.0
READY_TIMEOUT_SECONDS = 60.0
"""How long a consumer waits for its model server at start."""
_ERROR_LIMIT = 1000

log = logging.getLogger("mlc.streaming")

Headers = list[tuple[str, str | bytes | None]]


class DeliveryFailedError(Exception):
    """Some output of a batch was not acknowledged; the batch is not committed."""


class ScorerUnavailableError(DeliveryFailedError):
    """The model server did not answer; the batch is not committed and is scored again."""


SCORE_TIMEOUT_SECONDS = 300.0
_PR_SET_DUMPABLE = 4


class RemoteModel:
    """A model scored by its model server over a unix socket (see the module's docstring):
    what :class:`StreamScorer` needs of a :class:`LoadedModel`, without its code."""

    def __init__(self, package_dir: Path, socket_path: Path) -> None:
        self.manifest = load_manifest(package_dir)
        transport = httpx.HTTPTransport(uds=str(socket_path))
        self._http = httpx.Client(
            transport=transport, base_url="http://model", timeout=SCORE_TIMEOUT_SECONDS, trust_env=False
        )

    def wait_ready(self, timeout: float) -> None:
        """Return once the server answers ``/health``.

        Raises:
            ScorerUnavailableError: it did not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ScorerUnavailableError(f"the model server did not answer within {timeout:.0f} s")
            time.sleep(0.05)

    def score_batch(self, records: list[dict[str, Any]]) -> list[Any]:
        """The server's outputs for ``records``.

        Raises:
            ScorerUnavailableError: the server cannot be reached (nothing was scored).
            ValueError: the server refused or the model failed (its message).
        """
        try:
            response = self._http.post(
                "/score", content=orjson.dumps(records), headers={"content-type": "application/json"}
            )
        except httpx.TransportError as exc:
            raise ScorerUnavailableError(f"the model server is unreachable: {type(exc).__name__}") from exc
        if response.status_code in (502, 503):
            raise ScorerUnavailableError(f"the model server answered {response.status_code}")
        body = orjson.loads(response.content)
        if response.status_code != 200:
            raise ValueError(body.get("error") if isinstance(body, dict) else response.text[:500])
        return list(body)


def not_dumpable() -> None:
    """``PR_SET_DUMPABLE`` 0: processes of the same user cannot ptrace this one or read its
    memory (Linux; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


@dataclass
class StreamStats:
    """Counters the consumer logs periodically and returns when it stops."""

    scored: int = 0
    dead_lettered: int = 0
    batches: int = 0
    retried_batches: int = 0
    commit_failures: int = 0


@dataclass
class Lane:
    """One source the consumer scores, and where its outputs and dead letters go."""

    name: str
    consumer: Consumer
    output_topic: str
    dead_letter_topic: str
    pending: list[Message] = field(default_factory=list)


class StreamScorer:
    """Scores a deployment's streams until told to stop."""

    def __init__(
        self,
        config: StreamConfig,
        model: LoadedModel | RemoteModel,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.validator = RecordValidator(model.manifest.input_schema)
        self.client = with_secret(
            config.client, config.password_env, os.environ if environ is None else environ
        )
        self.stats = StreamStats()
        self._headers: Headers = [
            (HEADER_MODEL, config.model.encode()),
            (HEADER_VERSION, str(config.version).encode()),
            (HEADER_DEPLOYMENT, config.deployment_id.encode()),
        ]
        self._failures: list[str] = []
        self.producer = Producer(
            {
                **self.client,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 2,
                "client.id": f"mlc-{config.deployment_id}",
            }
        )
        self.lanes: list[Lane] = []
        if not config.standby:
            main = Consumer(self._consumer_config(config.group))
            main.subscribe([config.input_topic], on_assign=self._assigned, on_revoke=self._revoked)
            self.lanes.append(Lane("input", main, config.output_topic, config.dead_letter_topic))
        test = Consumer(self._consumer_config(f"mlc-test.{config.deployment_id}"))
        test.assign([TopicPartition(config.test_input_topic, 0, OFFSET_STORED)])
        # Test records that fail go to the test output topic too, marked with HEADER_ERROR,
        # so a stage test can quote the reason next to the sample.
        self.lanes.append(Lane("test", test, config.test_output_topic, config.test_output_topic))

    def _consumer_config(self, group: str) -> dict[str, Any]:
        return {
            **self.client,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            # Some brokers (Tansu) hold a fetch for its full wait even when records are
            # there; 500 ms (librdkafka's default) would then be every record's latency.
            "fetch.wait.max.ms": FETCH_WAIT_MS,
            "session.timeout.ms": self.config.session_timeout_ms,
            "heartbeat.interval.ms": self.config.heartbeat_interval_ms,
            "client.id": f"mlc-{self.config.deployment_id}",
        }

    @staticmethod
    def _assigned(consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing")

    @staticmethod
    def _revoked(consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing")

    def run(self, stop: threading.Event) -> StreamStats:
        """Poll, score, produce, commit, until ``stop`` is set; then leave the group cleanly."""
        next_stats = time.monotonic() + STATS_INTERVAL_SECONDS
        try:
            while not stop.is_set():
                for index, lane in enumerate(self.lanes):
                    wait = POLL_WAIT_SECONDS if index == 0 else 0.0
                    messages = lane.consumer.consume(self.config.max_poll_records, wait)
                    if messages:
                        self._handle(lane, messages)
                self.producer.poll(0)
                if time.monotonic() >= next_stats:
                    self._log_stats()
                    next_stats = time.monotonic() + STATS_INTERVAL_SECONDS
        finally:
            for lane in self.lanes:
                lane.consumer.close()  # nothing is uncommitted here; leaves the group at once
            self.producer.flush(DELIVERY_TIMEOUT_SECONDS)
            self._log_stats()
        return self.stats

    def _log_stats(self) -> None:
        s = self.stats
        log.info(
            "scored %d, dead-lettered %d in %d batches (%d retried, %d commits refused)",
            s.scored, s.dead_lettered, s.batches, s.retried_batches, s.commit_failures,
        )  # fmt: skip

    def _handle(self, lane: Lane, messages: list[Message]) -> None:
        records = [m for m in messages if self._usable(m)]
        if not records:
            return
        try:
            self.process(lane, records)
        except DeliveryFailedError as exc:
            self.stats.retried_batches += 1
            log.warning("%s; scoring the batch again in %.0f s", exc, RETRY_PAUSE_SECONDS)
            self._rewind(lane.consumer, records)
            time.sleep(RETRY_PAUSE_SECONDS)
            return
        self._commit(lane.consumer, records)

    @staticmethod
    def _usable(message: Message) -> bool:
        error = message.error()
        if error is None:
            return True
        if error.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error on %s: %s", message.topic(), error)
        return False

    def process(self, lane: Lane, messages: list[Message]) -> None:
        """Score ``messages`` and produce every output and dead letter, acknowledged.

        Raises:
            DeliveryFailedError: an output or dead letter was not acknowledged in time.
        """
        valid: list[tuple[Message, dict[str, Any]]] = []
        for message in messages:
            record, problem = self._decode(message)
            if problem is not None:
                self._dead_letter(lane, message, problem)
            else:
                assert record is not None
                valid.append((message, record))
        if valid:
            outputs = self._score([r for _, r in valid])
            for (message, _), output in zip(valid, outputs, strict=True):
                if isinstance(output, str):
                    self._dead_letter(lane, message, output)
                    continue
                self._produce(
                    lane.output_topic,
                    key=message.key(),
                    value=output,
                    headers=[*(message.headers() or []), *self._headers],
                )
                self.stats.scored += 1
        self.stats.batches += 1
        remaining = self.producer.flush(DELIVERY_TIMEOUT_SECONDS)
        failures, self._failures = self._failures, []
        if remaining or failures:
            why = (
                failures[0]
                if failures
                else f"{remaining} still unacknowledged after {DELIVERY_TIMEOUT_SECONDS:.0f} s"
            )
            raise DeliveryFailedError(
                f"{len(failures) or remaining} outputs of a {lane.name} batch failed: {why}"
            )

    def _decode(self, message: Message) -> tuple[dict[str, Any] | None, str | None]:
        """The record in ``message``, or why it cannot be scored."""
        try:
            record = orjson.loads(message.value() or b"")
        except orjson.JSONDecodeError as exc:
            return None, f"not valid JSON: {exc}"
        problems = self.validator.problems([record], limit=5)
        if problems:
            return None, "; ".join(
                f"field {p['field']!r}: {p['problem']}" if p["field"] else p["problem"] for p in problems
            ) + f" (input schema of model {self.config.model})"
        return record, None

    def _score(self, records: list[dict[str, Any]]) -> list[bytes | str]:
        """Serialized outputs, one per record, or a reason for each record that failed.

        One ``score_batch`` call for the whole poll; when it raises or answers malformed,
        each record is scored alone so one poison record cannot take its batch with it.
        """
        try:
            outputs = self.model.score_batch(records)
            if type(outputs) is list and len(outputs) == len(records):
                return [self._serialize(o) for o in outputs]
            log.warning(
                "score_batch returned %s for %d records; scoring one by one",
                type(outputs).__name__,
                len(records),
            )
        except ScorerUnavailableError:
            raise  # nothing was scored: the batch is scored again, not dead-lettered
        except Exception as exc:  # model code: anything can happen; isolate the culprit below
            log.warning("score_batch raised %s: %s; scoring one by one", type(exc).__name__, exc)
        return [self._score_one(record) for record in records]

    def _score_one(self, record: dict[str, Any]) -> bytes | str:
        try:
            outputs = self.model.score_batch([record])
        except ScorerUnavailableError:
            raise
        except ValueError as exc:
            if isinstance(self.model, RemoteModel):  # the server's message names the model and its error
                return str(exc)
            return f"model {self.config.model} raised {type(exc).__name__}: {exc}"
        except Exception as exc:
            return f"model {self.config.model} raised {type(exc).__name__}: {exc}"
        if type(outputs) is not list or len(outputs) != 1:
            return f"model {self.config.model}: score_batch() did not return a list of one output"
        return self._serialize(outputs[0])

    def _serialize(self, output: Any) -> bytes | str:
        if type(output) is not dict:
            return f"model {self.config.model} returned {type(output).__name__}, not an object"
        try:
            return orjson.dumps(output, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError as exc:
            return f"model {self.config.model} returned an output that is not JSON: {exc}"

    def _dead_letter(self, lane: Lane, message: Message, reason: str) -> None:
        source = f"{message.topic()}/{message.partition()}/{message.offset()}"
        self._produce(
            lane.dead_letter_topic,
            key=message.key(),
            value=message.value() or b"",
            headers=[
                *(message.headers() or []),
                *self._headers,
                (HEADER_ERROR, reason[:_ERROR_LIMIT].encode()),
                (HEADER_SOURCE, source.encode()),
            ],
        )
        self.stats.dead_lettered += 1

    def _produce(self, topic: str, *, key: str | bytes | None, value: bytes, headers: Headers) -> None:
        while True:
            try:
                self.producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=self._delivered
                )
                return
            except BufferError:  # the local queue is full: let deliveries drain
                self.producer.poll(0.05)

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failures.append(f"{message.topic()}: {error}")

    def _commit(self, consumer: Consumer, messages: list[Message]) -> None:
        """Commit past the batch, synchronously; a refused commit means redelivery, not loss."""
        offsets: dict[tuple[str, int], int] = {}
        for m in messages:
            topic, partition, offset = _position(m)
            offsets[(topic, partition)] = max(offsets.get((topic, partition), -1), offset + 1)
        try:
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
            )
        except KafkaException as exc:
            self.stats.commit_failures += 1
            log.warning("commit refused (%s): the batch will be scored again by the partition's owner", exc)

    @staticmethod
    def _rewind(consumer: Consumer, messages: list[Message]) -> None:
        """Seek each partition of an unacknowledged batch back to its first record."""
        first: dict[tuple[str, int], int] = {}
        for m in messages:
            topic, partition, offset = _position(m)
            first[(topic, partition)] = min(first.get((topic, partition), offset), offset)
        for (topic, partition), offset in first.items():
            try:
                consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # revoked meanwhile: its new owner starts from the commit
                log.warning("could not rewind %s[%d]: %s", topic, partition, exc)


def _position(message: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed record (always set when it has no error)."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset


def serve(package_dir: Path, config: StreamConfig, *, score_socket: Path | None = None) -> StreamStats:
    """Load the model (or, with ``score_socket``, reach its server there), start scoring,
    and stop cleanly on SIGTERM or SIGINT."""
    model: LoadedModel | RemoteModel
    if score_socket is not None:
        not_dumpable()
        model = RemoteModel(package_dir, score_socket)
        model.wait_ready(READY_TIMEOUT_SECONDS)
    else:
        model = load_model(package_dir)
    scorer = StreamScorer(config, model)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    lanes = ", ".join(
        f"{lane.name} {'group ' + config.group if lane.name == 'input' else config.test_input_topic}"
        for lane in scorer.lanes
    )
    log.info("deployment %s (%s@%d) scoring %s", config.deployment_id, config.model, config.version, lanes)
    print(READY_LINE, flush=True)
    return scorer.run(stop)
