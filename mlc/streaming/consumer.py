"""The streaming consumer: score what a poll returns, write each result, then commit.

One process (or container) per instance of a streaming deployment. It reads the input
topic in the deployment's consumer group, validates each record against the manifest's
input schema, scores the valid ones with one ``score_batch`` call per poll, and writes
each output to the output topic with the input's key and headers naming model, version
and deployment. A record that is not JSON, fails the schema or makes the model raise
goes to the dead-letter topic with the reason, and the stream goes on.

Delivery is at-least-once: a batch's offsets are committed only after the producer has
every output and dead letter of it, and of every earlier batch, acknowledged
(``acks=all``; see :mod:`mlc.streaming.inflight`). The next batch is polled and scored
while earlier outputs are in flight, and commits are asynchronous (a lost commit only
means records are scored again). A consumer killed before a commit leaves its batches
uncommitted, so whoever takes its partitions scores them again (duplicates, never loss).
A rebalance, which only happens inside a poll, first waits for every output in flight and
commits synchronously (``on_revoke``), and so does a stop: a clean stop or a version
switch neither loses nor repeats any record.

Nothing waits for company: a poll returns as soon as one record is there, with whatever
else has been fetched, so a lone record is scored at once and batches grow by themselves
when records arrive faster than one batch takes.

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
from mlc.streaming.inflight import Batch, InFlight, Position
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
FETCH_WAIT_MS = 10
"""The longest a fetch waits for records. Some brokers (Tansu) hold a fetch for all of it
even when records are there, so it is part of every record's latency there; elsewhere it
only paces an idle consumer's fetches."""
IDLE_POLL_SECONDS = 0.05
"""How long a poll that found nothing waits for the first record (it returns with it at once)."""
TEST_FETCH_WAIT_MS = 100
"""The test lane's fetch wait: stage tests do not need 10 ms, and an idle lane fetches less."""
REPORT_WAIT_SECONDS = 0.005
"""How long an idle loop with outputs in flight waits for a delivery report (it returns with
the first) before it polls for records again."""
MAX_IN_FLIGHT = 4
"""Batches per lane whose outputs may await acknowledgement while the next is scored."""
COMMIT_INTERVAL_SECONDS = 0.1
"""Acknowledged offsets are committed at most this often (all at once): small batches at a
modest rate would otherwise send the broker a commit each. A later commit only means more
records scored again after a crash; a rebalance or stop commits at once."""
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
    inflight: InFlight = field(default_factory=InFlight)
    acknowledged: dict[Position, int] = field(default_factory=dict)
    """The offsets safe to commit, per partition, since the lane's partitions were assigned."""
    uncommitted: bool = False
    """Something was acknowledged since the last commit."""
    committed_at: float = 0.0


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
        self.producer = Producer(
            {
                **self.client,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 5,
                # An output not acknowledged by then is reported failed, and its batch scored again.
                "message.timeout.ms": int(DELIVERY_TIMEOUT_SECONDS * 1000),
                "client.id": f"mlc-{config.deployment_id}",
            }
        )
        self.lanes: list[Lane] = []
        if not config.standby:
            main = Consumer(self._consumer_config(config.group, FETCH_WAIT_MS))
            lane = Lane("input", main, config.output_topic, config.dead_letter_topic)
            main.subscribe(
                [config.input_topic],
                on_assign=self._assigned,
                on_revoke=lambda consumer, partitions: self._revoked(lane, partitions),
            )
            self.lanes.append(lane)
        test = Consumer(self._consumer_config(f"mlc-test.{config.deployment_id}", TEST_FETCH_WAIT_MS))
        test.assign([TopicPartition(config.test_input_topic, 0, OFFSET_STORED)])
        # Test records that fail go to the test output topic too, marked with HEADER_ERROR,
        # so a stage test can quote the reason next to the sample.
        self.lanes.append(Lane("test", test, config.test_output_topic, config.test_output_topic))

    def _consumer_config(self, group: str, fetch_wait_ms: int) -> dict[str, Any]:
        return {
            **self.client,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": fetch_wait_ms,
            "session.timeout.ms": self.config.session_timeout_ms,
            "heartbeat.interval.ms": self.config.heartbeat_interval_ms,
            "client.id": f"mlc-{self.config.deployment_id}",
            "on_commit": self._committed,
        }

    @staticmethod
    def _assigned(consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing")

    def _revoked(self, lane: Lane, partitions: list[TopicPartition]) -> None:
        """Before partitions go: wait for every output in flight and commit what was acknowledged."""
        self._drain(lane)
        lane.acknowledged.clear()  # their next owner commits them from now on
        log.info("revoked %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing")

    def run(self, stop: threading.Event) -> StreamStats:
        """Poll, score, produce, commit, until ``stop`` is set; then leave the group cleanly."""
        next_stats = time.monotonic() + STATS_INTERVAL_SECONDS
        try:
            while not stop.is_set():
                busy = any(lane.inflight for lane in self.lanes)
                polled = False
                for index, lane in enumerate(self.lanes):
                    # Only the first lane waits, and not while outputs await acknowledgement.
                    messages = self._poll(lane, IDLE_POLL_SECONDS if index == 0 and not busy else 0.0)
                    if messages:
                        polled = True
                        self._handle(lane, messages)
                # Nothing new but outputs in flight: wait for their reports (poll returns
                # with the first), not spin.
                self.producer.poll(REPORT_WAIT_SECONDS if busy and not polled else 0)
                for lane in self.lanes:
                    self._settle(lane)
                if time.monotonic() >= next_stats:
                    self._log_stats()
                    next_stats = time.monotonic() + STATS_INTERVAL_SECONDS
        finally:
            for lane in self.lanes:
                self._drain(lane)
                lane.consumer.close()  # nothing is uncommitted here; leaves the group at once
            self.producer.flush(DELIVERY_TIMEOUT_SECONDS)
            self._log_stats()
        return self.stats

    def _poll(self, lane: Lane, wait: float) -> list[Message]:
        """What has been fetched (at most ``max_poll_records``); when nothing has, the first
        record to arrive within ``wait`` and whatever came with it."""
        limit = self.config.max_poll_records
        messages = lane.consumer.consume(limit, 0)
        if not messages and wait > 0:
            messages = lane.consumer.consume(1, wait)
            if messages and limit > 1:
                messages += lane.consumer.consume(limit - 1, 0)
        return messages

    def _log_stats(self) -> None:
        s = self.stats
        log.info(
            "scored %d, dead-lettered %d in %d batches (%d retried, %d commits refused)",
            s.scored, s.dead_lettered, s.batches, s.retried_batches, s.commit_failures,
        )  # fmt: skip

    def _handle(self, lane: Lane, messages: list[Message]) -> None:
        records = [m for m in messages if m.error() is None or self._usable(m)]
        if not records:
            return
        batch = Batch.of(records)
        try:
            self.process(lane, records, batch)
        except ScorerUnavailableError as exc:  # nothing of it was scored: score it again
            self._retry(lane, f"{exc}; nothing of a {lane.name} batch was scored", batch.starts)
            return
        lane.inflight.add(batch)
        if len(lane.inflight) > MAX_IN_FLIGHT:
            self._await_oldest(lane)

    @staticmethod
    def _usable(message: Message) -> bool:
        error = message.error()
        if error is None:
            return True
        if error.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error on %s: %s", message.topic(), error)
        return False

    def process(self, lane: Lane, messages: list[Message], batch: Batch) -> None:
        """Score ``messages`` and hand every output and dead letter to the producer, each
        reporting its delivery to ``batch`` (sealed once all are handed over).

        Raises:
            ScorerUnavailableError: the model server did not answer; nothing was scored.
        """
        valid, records = self._decode_all(lane, messages, batch)
        if valid:
            outputs = self._score(records)
            # The hot loop (once per record): no call that is not needed, one counter update.
            produce, topic, ours, delivered = (
                self.producer.produce,
                lane.output_topic,
                self._headers,
                batch.delivered,
            )
            batch.outstanding += len(valid)
            scored = 0
            for message, output in zip(valid, outputs, strict=True):
                if type(output) is str:
                    batch.outstanding -= 1
                    self._dead_letter(lane, message, output, batch)
                    continue
                theirs = message.headers()
                headers = ours if theirs is None else [*theirs, *ours]
                while True:
                    try:
                        produce(topic, output, message.key(), headers=headers, on_delivery=delivered)
                        break
                    except BufferError:  # the local queue is full: let deliveries drain
                        self.producer.poll(0.05)
                scored += 1
            self.stats.scored += scored
        batch.sealed = True
        self.stats.batches += 1

    def _decode_all(
        self, lane: Lane, messages: list[Message], batch: Batch
    ) -> tuple[list[Message], list[dict[str, Any]]]:
        """The messages holding valid records, and their records; the rest dead-lettered.

        Records shaped like ones already checked pass the schema as a whole (one
        :meth:`RecordValidator.problems` call); only a batch with a problem is checked
        record by record, to say which records and why."""
        valid: list[Message] = []
        records: list[dict[str, Any]] = []
        for message in messages:
            try:
                records.append(orjson.loads(message.value() or b""))
                valid.append(message)
            except orjson.JSONDecodeError as exc:
                self._dead_letter(lane, message, f"not valid JSON: {exc}", batch)
        if not self.validator.problems(records, limit=1):
            return valid, records
        checked: tuple[list[Message], list[dict[str, Any]]] = ([], [])
        for message, record in zip(valid, records, strict=True):
            problem = self._problem(record)
            if problem is None:
                checked[0].append(message)
                checked[1].append(record)
            else:
                self._dead_letter(lane, message, problem, batch)
        return checked

    def _problem(self, record: Any) -> str | None:
        """Why ``record`` does not match the input schema, or None."""
        problems = self.validator.problems([record], limit=5)
        if not problems:
            return None
        return (
            "; ".join(
                f"field {p['field']!r}: {p['problem']}" if p["field"] else p["problem"] for p in problems
            )
            + f" (input schema of model {self.config.model})"
        )

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

    def _dead_letter(self, lane: Lane, message: Message, reason: str, batch: Batch) -> None:
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
            batch=batch,
        )
        self.stats.dead_lettered += 1

    def _produce(
        self, topic: str, *, key: str | bytes | None, value: bytes, headers: Headers, batch: Batch
    ) -> None:
        batch.expect()
        while True:
            try:
                self.producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=batch.delivered
                )
                return
            except BufferError:  # the local queue is full: let deliveries drain
                self.producer.poll(0.05)

    def _settle(self, lane: Lane, *, synchronous: bool = False) -> None:
        """Commit what the lane's acknowledged batches hold; score failed ones again."""
        done = lane.inflight.settle()
        if done.commit:
            lane.acknowledged.update(done.commit)
            lane.uncommitted = True
        now = time.monotonic()
        # A synchronous commit repeats every offset, so none is left to an asynchronous
        # commit that may still be on its way when the consumer closes or its partitions go.
        if lane.acknowledged and (
            synchronous or (lane.uncommitted and now - lane.committed_at >= COMMIT_INTERVAL_SECONDS)
        ):
            self._commit(lane.consumer, lane.acknowledged, synchronous=synchronous)
            lane.uncommitted, lane.committed_at = False, now
        if done.failure is not None:
            self._retry(lane, f"{done.batches} {lane.name} batches failed: {done.failure}", done.rewind)

    def _await_oldest(self, lane: Lane) -> None:
        """Serve delivery reports until the lane's oldest batch is settled (or given up on)."""
        oldest = lane.inflight.oldest()
        deadline = time.monotonic() + DELIVERY_TIMEOUT_SECONDS
        while oldest is not None and not oldest.settled:
            if time.monotonic() > deadline:
                oldest.fail(f"still unacknowledged after {DELIVERY_TIMEOUT_SECONDS:.0f} s")
                break
            self.producer.poll(0.01)
        self._settle(lane)

    def _drain(self, lane: Lane) -> None:
        """Wait for every output of the lane in flight and commit synchronously (before its
        partitions are revoked, or the consumer stops)."""
        while lane.inflight:
            self._await_oldest(lane)
        self._settle(lane, synchronous=True)

    def _retry(self, lane: Lane, why: str, rewind: dict[Position, int]) -> None:
        self.stats.retried_batches += 1
        log.warning("%s; scoring them again in %.0f s", why, RETRY_PAUSE_SECONDS)
        for (topic, partition), offset in rewind.items():
            try:
                lane.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # revoked meanwhile: its new owner starts from the commit
                log.warning("could not rewind %s[%d]: %s", topic, partition, exc)
        time.sleep(RETRY_PAUSE_SECONDS)

    def _commit(self, consumer: Consumer, offsets: dict[Position, int], *, synchronous: bool) -> None:
        """Commit acknowledged offsets; a refused commit means redelivery, not loss."""
        partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            if not synchronous:
                consumer.commit(offsets=partitions, asynchronous=True)
                return
            refused = [p for p in consumer.commit(offsets=partitions, asynchronous=False) if p.error]
        except KafkaException as exc:
            self._commit_refused(exc)
            return
        if refused:
            self._commit_refused(refused[0].error)

    def _committed(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """The outcome of an asynchronous commit (librdkafka calls this for those only)."""
        if error is not None:
            self._commit_refused(error)

    def _commit_refused(self, error: object) -> None:
        self.stats.commit_failures += 1
        log.warning("commit refused (%s): the records will be scored again by the partition's owner", error)


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
